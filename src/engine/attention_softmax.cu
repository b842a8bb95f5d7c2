// Row softmax of attention scores for src/engine/cuda_attention.rs, compiled at run time by NVRTC
// (no CUDA headers needed). One block per row of `ncols` f32 scores; with `first_visible >= 0` the
// row `r` (query `r % rows_per_head`) sees only keys `0..=first_visible + r % rows_per_head` (a
// causal mask), the others get probability 0. The probabilities are written in the model dtype:
// one read of the scores from memory (the row stays in L2 between the three sweeps) and one write,
// instead of a mask pass, a three-sweep softmax and a cast over f32 buffers.

#define BLOCK 256
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The reduction of `v` over the block, returned to every thread.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float partial[BLOCK / 32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < BLOCK / 32 ? partial[lane] : (MAX ? NEG_INF : 0.0f);
        w = MAX ? warp_max(w) : warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

__device__ __forceinline__ void store_f32(float *dst, float p) { *dst = p; }

// round to nearest even (probabilities are finite)
__device__ __forceinline__ void store_bf16(unsigned short *dst, float p) {
    unsigned int u = __float_as_uint(p);
    u += 0x7fffu + ((u >> 16) & 1u);
    *dst = (unsigned short)(u >> 16);
}

__device__ __forceinline__ void store_f16(unsigned short *dst, float p) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(p));
    *dst = h;
}

template <typename T, int KIND>
__device__ void softmax_row(const float *scores, T *probs, int ncols, int rows_per_head,
                            long long first_visible) {
    const long long row = blockIdx.x;
    const float *x = scores + row * (long long)ncols;
    T *y = probs + row * (long long)ncols;
    int limit = ncols;
    if (first_visible >= 0) {
        const long long last = first_visible + (row % rows_per_head);
        limit = last + 1 < (long long)ncols ? (int)(last + 1) : ncols;
    }
    float m = NEG_INF;
    for (int c = threadIdx.x; c < limit; c += BLOCK) m = fmaxf(m, x[c]);
    m = block_reduce<true>(m);
    float s = 0.0f;
    for (int c = threadIdx.x; c < limit; c += BLOCK) s += expf(x[c] - m);
    s = block_reduce<false>(s);
    const float inv = 1.0f / s;
    for (int c = threadIdx.x; c < ncols; c += BLOCK) {
        const float p = c < limit ? expf(x[c] - m) * inv : 0.0f;
        if (KIND == 0) store_f32((float *)&y[c], p);
        else if (KIND == 1) store_bf16((unsigned short *)&y[c], p);
        else store_f16((unsigned short *)&y[c], p);
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK)
attention_softmax_f32(const float *scores, float *probs, int ncols, int rows_per_head, long long first_visible) {
    softmax_row<float, 0>(scores, probs, ncols, rows_per_head, first_visible);
}

extern "C" __global__ void __launch_bounds__(BLOCK)
attention_softmax_bf16(const float *scores, unsigned short *probs, int ncols, int rows_per_head, long long first_visible) {
    softmax_row<unsigned short, 1>(scores, probs, ncols, rows_per_head, first_visible);
}

extern "C" __global__ void __launch_bounds__(BLOCK)
attention_softmax_f16(const float *scores, unsigned short *probs, int ncols, int rows_per_head, long long first_visible) {
    softmax_row<unsigned short, 2>(scores, probs, ncols, rows_per_head, first_visible);
}
