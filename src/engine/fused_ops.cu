// Fused elementwise steps of the decoder and the vision tower on bf16, for
// src/engine/cuda_fused.rs, compiled at run time by NVRTC (no CUDA headers needed). Each replaces a
// run of candle ops, one launch instead of several. The decoder's give the bits of separate bf16
// ops (each product and sum rounded to bf16, as the reference rounds them):
//   bias_rope_cache: the q/k/v projection's bias, the rotary embedding of q and k (rotate-half),
//     q written out contiguous, k and v written into the KV cache at row `pos` (was: bias add,
//     two copies, two rotations, a copy of v and two cache writes);
//   add_rmsnorm: the residual sum and the RMS norm of the sum (was: add, norm);
//   silu_mul: silu(gate) · up from the gate/up projection's stacked output (was: silu, mul).

typedef unsigned short u16;

#define NEG_INF_F __int_as_float(0xff800000)

__device__ __forceinline__ float widen(u16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ u16 round_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// bf16 ops: the exact result rounded once (sums and products of two bf16 are exact in f32 up to
// the rounding)
__device__ __forceinline__ float add(float a, float b) { return widen(round_bf16(a + b)); }
__device__ __forceinline__ float mul(float a, float b) { return widen(round_bf16(a * b)); }
__device__ __forceinline__ float sub(float a, float b) { return widen(round_bf16(a - b)); }

// One thread per pair (i, i + d/2) of one head of one row. `y` (s, (heads + 2 kv_heads) · d)
// with row stride y_row; bias of that width or null; cos/sin (s, d/2); q_out (s, heads, d);
// caches (capacity, kv_heads, d), rows pos.. written. A non-null pos_dev holds the position on
// the device instead (a decode step replayed from a CUDA graph).
extern "C" __global__ void bias_rope_cache_bf16(const u16 *y, long long y_row, const u16 *bias,
                                                const u16 *cos, const u16 *sin, u16 *q_out,
                                                u16 *k_cache, u16 *v_cache, int s, int heads,
                                                int kv_heads, int d, long long pos,
                                                const int *pos_dev) {
    if (pos_dev) pos = *pos_dev;
    const int half = d / 2;
    const long long pairs_per_row = (long long)(heads + 2 * kv_heads) * half;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pairs_per_row * s) return;
    const long long row = idx / pairs_per_row;
    const int pair = (int)(idx % pairs_per_row);
    const int head = pair / half, i = pair % half;
    const long long c1 = (long long)head * d + i, c2 = c1 + half;
    float a = widen(y[row * y_row + c1]), b = widen(y[row * y_row + c2]);
    if (bias) {
        a = add(a, widen(bias[c1]));
        b = add(b, widen(bias[c2]));
    }
    if (head >= heads + kv_heads) {
        u16 *dst = v_cache + ((pos + row) * kv_heads + (head - heads - kv_heads)) * d + i;
        dst[0] = round_bf16(a);
        dst[half] = round_bf16(b);
        return;
    }
    const float cs = widen(cos[row * half + i]), sn = widen(sin[row * half + i]);
    // x1·cos − x2·sin and x1·sin + x2·cos with every product and sum rounded, as the
    // reference's separate bf16 ops (candle's rope_thd kernel contracts one product into a
    // multiply-add instead)
    const u16 r1 = round_bf16(sub(mul(a, cs), mul(b, sn)));
    const u16 r2 = round_bf16(add(mul(a, sn), mul(b, cs)));
    u16 *dst = head < heads ? q_out + (row * heads + head) * d + i
                            : k_cache + ((pos + row) * kv_heads + (head - heads)) * d + i;
    dst[0] = r1;
    dst[half] = r2;
}

#define NORM_BLOCK 256

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[NORM_BLOCK / 32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < NORM_BLOCK / 32 ? partial[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
        if (threadIdx.x == 0) total = w;
    }
    __syncthreads();
    return total;
}

// One block per row: sum = x + y (rounded), normed = sum · rsqrt(mean(sum²) + eps) · w (candle's
// rms_norm: f32 inside, one rounding).
extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
add_rmsnorm_bf16(const u16 *x, const u16 *y, const u16 *w, u16 *sum_out, u16 *normed_out,
                 int ncols, float eps) {
    const long long base = (long long)blockIdx.x * ncols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < ncols; c += NORM_BLOCK) {
        const u16 v = round_bf16(widen(x[base + c]) + widen(y[base + c]));
        sum_out[base + c] = v;
        const float f = widen(v);
        squares += f * f;
    }
    const float scale = rsqrtf(block_sum(squares) / ncols + eps);
    // each thread reads back the values it wrote itself
    for (int c = threadIdx.x; c < ncols; c += NORM_BLOCK) {
        normed_out[base + c] = round_bf16(scale * widen(sum_out[base + c]) * widen(w[c]));
    }
}

// out (rows, width) = silu(gate) · up with gate = gu[:, :width], up = gu[:, width:] (row stride
// 2 · width); candle's bf16 silu rounds x / (1 + exp(−x)) once, the product once more.
extern "C" __global__ void silu_mul_bf16(const u16 *gu, u16 *out, int width, long long total) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const long long row = idx / width, c = idx % width;
    const float g = widen(gu[row * 2 * width + c]), u = widen(gu[row * 2 * width + width + c]);
    out[idx] = round_bf16(widen(round_bf16(g / (1.0f + expf(-g)))) * u);
}

// The index of the largest of n f32 values (the first of equal ones; NaN never wins) as
// ~index in the low 32 bits of *best under the value's order-preserving bits in the high 32:
// one atomicMax per block into a zeroed *best.
__device__ __forceinline__ unsigned long long argmax_key(float v, unsigned int i) {
    const unsigned int u = __float_as_uint(v);
    const unsigned int ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (unsigned long long)(~i);
}

extern "C" __global__ void __launch_bounds__(256)
argmax_f32(const float *x, long long n, unsigned long long *best) {
    unsigned long long key = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        if (v == v) {
            const unsigned long long k = argmax_key(v, (unsigned int)i);
            key = k > key ? k : key;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
    }
    __shared__ unsigned long long partial[8];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = key;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; ++w) key = partial[w] > key ? partial[w] : key;
        atomicMax(best, key);
    }
}

// The embedding row of a greedy token still on the device: `key` is argmax_f32's result (the
// complemented index in its low half; 0 when every logit was NaN, which the host reports, so row
// 0 stands in). out = table[id] (hidden values).
extern "C" __global__ void embed_key_bf16(const unsigned long long *key, const u16 *table,
                                          int vocab, int hidden, u16 *out) {
    const unsigned long long k = *key;
    unsigned int id = ~(unsigned int)k;
    if (k == 0ull || id >= (unsigned int)vocab) id = 0;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden; c += gridDim.x * blockDim.x)
        out[c] = table[(long long)id * hidden + c];
}

// Vision tower steps (bf16 values, f32 rotary tables):
//   bias_quick_gelu: h = y + bias (rounded), out = h · sigmoid(1.702 · h) in f32, rounded once;
//   bias_residual: out = residual + (y + bias) (each sum rounded, as two bf16 adds);
//   vision_qkv_rope: the stacked q/k/v projection's bias, then q and k rotated in f32 with f32
//     tables and rounded once (the reference's float() rotation), v copied: out (3, n, heads, d).
// `y` rows have `cols` values (unit stride, row stride y_row), `bias` is null or `cols` long.

extern "C" __global__ void bias_quick_gelu_bf16(const u16 *y, long long y_row, const u16 *bias,
                                                u16 *out, int cols, long long total) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const long long row = idx / cols;
    const int c = (int)(idx % cols);
    float h = widen(y[row * y_row + c]);
    if (bias) h = add(h, widen(bias[c]));
    out[idx] = round_bf16(h / (1.0f + expf(-1.702f * h)));
}

extern "C" __global__ void bias_residual_bf16(const u16 *y, long long y_row, const u16 *bias,
                                              const u16 *residual, u16 *out, int cols,
                                              long long total) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const long long row = idx / cols;
    const int c = (int)(idx % cols);
    float h = widen(y[row * y_row + c]);
    if (bias) h = add(h, widen(bias[c]));
    out[idx] = round_bf16(widen(residual[idx]) + h);
}

// One thread per pair (i, i + d/2) of one head of q, k or v of one row.
extern "C" __global__ void vision_qkv_rope_bf16(const u16 *y, long long y_row, const u16 *bias,
                                                const float *cos, const float *sin, u16 *out,
                                                int n, int heads, int d) {
    const int half = d / 2;
    const long long pairs_per_row = 3LL * heads * half;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pairs_per_row * n) return;
    const long long row = idx / pairs_per_row;
    const int pair = (int)(idx % pairs_per_row);
    const int head = pair / half, i = pair % half;  // head over q, k, v: 0 .. 3·heads
    const long long c1 = (long long)head * d + i, c2 = c1 + half;
    float a = widen(y[row * y_row + c1]), b = widen(y[row * y_row + c2]);
    if (bias) {
        a = add(a, widen(bias[c1]));
        b = add(b, widen(bias[c2]));
    }
    const int part = head / heads;  // 0 q, 1 k, 2 v
    u16 *dst = out + (((long long)part * n + row) * heads + head % heads) * d + i;
    if (part < 2) {
        const float cs = cos[row * half + i], sn = sin[row * half + i];
        const float r1 = a * cs - b * sn, r2 = a * sn + b * cs;
        a = r1;
        b = r2;
    }
    dst[0] = round_bf16(a);
    dst[half] = round_bf16(b);
}

// One-token decode: products with one row of activations are bound by reading the weights, and
// cuBLAS spends more time choosing its kernel on the host than the GPU spends reading.
//   gemv: y (n) = x (k) · Wᵀ with W (n, k) row-major, f32 sums rounded once;
//   gemv_silu: the decoder MLP's stacked [G; U] (2·width, k): silu(x·gᵀ) · (x·uᵀ), each product
//     rounded to bf16 first, then rounded as silu_mul rounds (the bits of gemv + silu_mul).
// One warp per output row, 16-byte loads; k must be a multiple of 8 and the rows 16-byte aligned.

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    const unsigned int ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        s += __uint_as_float(ws[i] << 16) * __uint_as_float(xs[i] << 16);
        s += __uint_as_float(ws[i] & 0xffff0000u) * __uint_as_float(xs[i] & 0xffff0000u);
    }
    return s;
}

__device__ __forceinline__ float warp_dot(const u16 *__restrict__ w_row, const u16 *__restrict__ x,
                                          int k) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    // four 16-byte weight loads in flight per lane (the sums stay in order)
#pragma unroll 4
    for (int c = lane * 8; c < k; c += 32 * 8) {
        s += dot8(*(const uint4 *)(w_row + c), *(const uint4 *)(x + c));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

extern "C" __global__ void __launch_bounds__(256)
gemv_bf16(const u16 *w, const u16 *x, u16 *y, int n, int k) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= n) return;
    const float s = warp_dot(w + row * k, x, k);
    if ((threadIdx.x & 31) == 0) y[row] = round_bf16(s);
}

extern "C" __global__ void __launch_bounds__(256)
gemv_silu_bf16(const u16 *w, const u16 *x, u16 *y, int width, int k) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= width) return;
    const float g = widen(round_bf16(warp_dot(w + row * k, x, k)));
    const float u = widen(round_bf16(warp_dot(w + (row + width) * k, x, k)));
    if ((threadIdx.x & 31) == 0) y[row] = round_bf16(widen(round_bf16(g / (1.0f + expf(-g)))) * u);
}

// Attention of one query per head over T cached keys (decode), split over the keys: each block
// takes KEYS_PER_SPLIT keys of one head and writes its row maximum, sum of exponentials and
// unnormalised output (f32) to `partial`; decode_attention_combine merges the splits of a head.
// q (heads, d) contiguous; k, v (T, kv_heads, d) with row stride kv_row; d ≤ 128, a multiple of 8.
// A non-null pos_dev holds the new key's position on the device (T = *pos_dev + 1, a step replayed
// from a CUDA graph): the grid then covers the cache's capacity and the splits past T do nothing.
#define KEYS_PER_SPLIT 128
#define MAX_D 128

extern "C" __global__ void __launch_bounds__(KEYS_PER_SPLIT)
decode_attention_split_bf16(const u16 *q, const u16 *k, const u16 *v, float *partial, int t,
                            int rep, int d, long long kv_row, float scale, const int *pos_dev) {
    __shared__ float qs[MAX_D];
    __shared__ float ps[KEYS_PER_SPLIT];
    __shared__ float reduce[KEYS_PER_SPLIT / 32];
    const int head = blockIdx.x, split = blockIdx.y, kv_head = head / rep;
    const int tid = threadIdx.x;
    if (pos_dev) t = *pos_dev + 1;
    if ((long long)split * KEYS_PER_SPLIT >= t) return;  // (the whole block)
    if (tid < d) qs[tid] = widen(q[(long long)head * d + tid]);
    __syncthreads();
    const long long key = (long long)split * KEYS_PER_SPLIT + tid;
    float score = NEG_INF_F;
    if (key < t) {
        const u16 *kr = k + key * kv_row + (long long)kv_head * d;
        float s = 0.0f;
        for (int c = 0; c < d; c += 8) {
            const uint4 w = *(const uint4 *)(kr + c);
            const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s += __uint_as_float(ws[i] << 16) * qs[c + 2 * i];
                s += __uint_as_float(ws[i] & 0xffff0000u) * qs[c + 2 * i + 1];
            }
        }
        score = s * scale;
    }
    // the split's maximum and sum of exponentials
    float m = score;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((tid & 31) == 0) reduce[tid >> 5] = m;
    __syncthreads();
    m = reduce[0];
#pragma unroll
    for (int w = 1; w < KEYS_PER_SPLIT / 32; ++w) m = fmaxf(m, reduce[w]);
    const float p = key < t ? expf(score - m) : 0.0f;
    ps[tid] = p;
    float l = p;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    __syncthreads();  // everyone has read reduce[] (the maxima) before it holds the sums
    if ((tid & 31) == 0) reduce[tid >> 5] = l;
    __syncthreads();
    float* out = partial + ((long long)head * gridDim.y + split) * (d + 2);
    if (tid == 0) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < KEYS_PER_SPLIT / 32; ++w) total += reduce[w];
        out[0] = m;
        out[1] = total;
    }
    // unnormalised p·v: thread c sums column c over the split's keys
    if (tid < d) {
        const long long first = (long long)split * KEYS_PER_SPLIT;
        const int count = t - first < KEYS_PER_SPLIT ? (int)(t - first) : KEYS_PER_SPLIT;
        float acc = 0.0f;
        for (int j = 0; j < count; ++j) {
            acc += ps[j] * widen(v[(first + j) * kv_row + (long long)kv_head * d + tid]);
        }
        out[2 + tid] = acc;
    }
}

// One block per head: out (heads, d) = Σ_splits o_i · e^(m_i − M) / Σ_splits l_i · e^(m_i − M).
extern "C" __global__ void __launch_bounds__(MAX_D)
decode_attention_combine_bf16(const float *partial, u16 *out, int splits, int d,
                              const int *pos_dev) {
    const int head = blockIdx.x, tid = threadIdx.x;
    const float *p = partial + (long long)head * splits * (d + 2);
    // the splits that hold keys (all but those past a device-held length)
    const int used = pos_dev ? (*pos_dev + KEYS_PER_SPLIT) / KEYS_PER_SPLIT : splits;
    float m = NEG_INF_F;
    for (int i = 0; i < used; ++i) m = fmaxf(m, p[i * (d + 2)]);
    float l = 0.0f, acc = 0.0f;
    for (int i = 0; i < used; ++i) {
        const float f = expf(p[i * (d + 2)] - m);
        l += p[i * (d + 2) + 1] * f;
        if (tid < d) acc += p[i * (d + 2) + 2 + tid] * f;
    }
    if (tid < d) out[(long long)head * d + tid] = round_bf16(acc / l);
}
