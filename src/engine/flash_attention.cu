// Flash attention for src/engine/cuda_attention.rs, compiled at run time by NVRTC (no CUDA headers
// needed): softmax(q·kᵀ·scale)·v with bf16 or f16 operands, f32 sums on the tensor cores
// (mma.sync m16n8k16), and the scores kept in registers: nothing of size queries × keys is ever
// written to memory (FlashAttention-2's scheme, in one pass over the keys with an online softmax).
//
// Layouts (element strides; every row of q, k, v and out holds its heads side by side, each head
// `D` contiguous values):
//   q   (S, kv_heads * rep, D), row stride q_row       out (S, kv_heads * rep, D), out_row
//   k   (T, kv_heads, D),       row stride k_row       v   (T, kv_heads, D),       v_row
// Grouped-query attention: the `rep` query heads of one key/value head share its keys and values.
// They become the rows of one problem: virtual row `r` is query `r / rep`, head `kv_head * rep +
// r % rep`, so every key tile loaded serves all of them.
// Causal mask: with causal_offset >= 0, query i sees keys 0..=i + causal_offset.
//
// Grid: (ceil(S * rep / 64), kv_heads); block: 4 warps, 16 virtual rows each. Per tile of 64 keys
// the block stages K and V in shared memory (FLASH_ASYNC defined to 1: with cp.async, the values
// of a tile landing while the scores are computed and the next tile's keys while the values are
// multiplied, FlashAttention-2's overlap; else loaded through registers before each tile, every
// warp waiting for them); each warp computes its 16 × 64 scores with the
// tensor cores, updates the running row maxima and sums, rounds the probabilities to the operand
// type (as FlashAttention does) and accumulates p·v. The row sums are of the unrounded f32
// probabilities. Requirements (checked by the caller): D a multiple of 16, every row stride and
// the operands' addresses multiples of 8 elements (16 bytes).

#ifndef FLASH_ASYNC
#define FLASH_ASYNC 0
#endif

#define ROWS 64       // virtual rows per block
#define KEYS 64       // keys per tile
#define WARPS 4
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short u16;
typedef unsigned int u32;

struct alignas(16) Vec16 {
    u32 x, y, z, w;
};

template <bool BF16>
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two f32 rounded to nearest into one register, `lo` in the low half (the lower column).
template <bool BF16>
__device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// 2^x, the hardware approximation (2 ulp; the probabilities are rounded to 8 bits after it).
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Four 8×8 matrices of 16-bit values from shared memory: lane l supplies the address of row
// l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u16 *row) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const u16 *row) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// 16 bytes from global to shared memory without passing through registers; `valid` false fills
// the 16 bytes with zeros (nothing is read; `src` must still be a valid address).
__device__ __forceinline__ void cp_async16(u16 *dst, const u16 *src, bool valid) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(dst));
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(address), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Queues the copies of keys key0..key0 + KEYS of one head (`src` rows of `row` elements, the
// head's D values at kv_head * D) into a tile of STRIDE-element rows; zeros past key t.
template <int D>
__device__ __forceinline__ void stage_async(u16 *tile, const u16 *src, long long key0, int t,
                                            long long row, int kv_head) {
    for (int idx = threadIdx.x; idx < KEYS * (D / 8); idx += WARPS * 32) {
        const int r = idx / (D / 8), chunk = idx % (D / 8);
        const long long key = key0 + r;
        const bool valid = key < t;
        const u16 *from = valid ? src + key * row + (long long)kv_head * D + chunk * 8 : src;
        cp_async16(tile + r * (D + 8) + chunk * 8, from, valid);
    }
}

template <int D, bool BF16>
__device__ void flash_attention(const u16 *__restrict__ q, const u16 *__restrict__ k,
                                const u16 *__restrict__ v, u16 *__restrict__ out, int s, int t,
                                int rep, long long q_row, long long k_row, long long v_row,
                                long long out_row, float scale_log2, long long causal_offset) {
    // rows padded by 8 values: the fragment loads of 8 rows then hit 32 distinct banks
    constexpr int STRIDE = D + 8;
    __shared__ Vec16 ks_storage[KEYS * STRIDE / 8], vs_storage[KEYS * STRIDE / 8];
    u16 *ks = (u16 *)ks_storage, *vs = (u16 *)vs_storage;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = lane >> 2, quad = lane & 3;  // mma fragment coordinates
    const int kv_head = blockIdx.y;
    const long long rows = (long long)s * rep;
    const long long tile_row = (long long)blockIdx.x * ROWS;

    // this thread's two virtual rows (fragment rows `group` and `group + 8` of its warp)
    long long row[2], query[2];
    int head[2];
    bool live[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        row[i] = tile_row + warp * 16 + group + 8 * i;
        live[i] = row[i] < rows;
        query[i] = live[i] ? row[i] / rep : 0;
        head[i] = kv_head * rep + (live[i] ? (int)(row[i] % rep) : 0);
    }

    // the warp's queries as A fragments, one per 16 columns, read once
    u32 qa[D / 16][4];
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u16 *src = q + query[i] * q_row + (long long)head[i] * D + c * 16 + 2 * quad;
            qa[c][i] = live[i] ? *(const u32 *)src : 0u;
            qa[c][i + 2] = live[i] ? *(const u32 *)(src + 8) : 0u;
        }
    }

    // keys this block needs: all, or up to what its last query sees
    long long last_row = tile_row + ROWS - 1 < rows ? tile_row + ROWS - 1 : rows - 1;
    long long key_end = t;
    if (causal_offset >= 0) {
        const long long limit = last_row / rep + causal_offset + 1;
        key_end = limit < key_end ? limit : key_end;
    }

    float acc[D / 8][4];
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    }
    float row_max[2] = {NEG_INF, NEG_INF};
    float row_sum[2] = {0.0f, 0.0f};  // this thread's share; the quad's lanes are summed at the end

    if (FLASH_ASYNC) {
        stage_async<D>(ks, k, 0, t, k_row, kv_head);
        cp_async_commit();
    }
    for (long long key0 = 0; key0 < key_end; key0 += KEYS) {
        if (FLASH_ASYNC) {
            // every warp is done with the last tile's values: this tile's may land meanwhile
            __syncthreads();
            stage_async<D>(vs, v, key0, t, v_row, kv_head);
            cp_async_commit();
            cp_async_wait<1>();  // this tile's keys (queued before the values)
            __syncthreads();
        } else {
            // stage the tile's keys and values (zeros past the last key)
            __syncthreads();
            for (int idx = threadIdx.x; idx < KEYS * (D / 8); idx += WARPS * 32) {
                const int r = idx / (D / 8), chunk = idx % (D / 8);
                const long long key = key0 + r;
                Vec16 kx = {0u, 0u, 0u, 0u}, vx = {0u, 0u, 0u, 0u};
                if (key < t) {
                    kx = *(const Vec16 *)(k + key * k_row + (long long)kv_head * D + chunk * 8);
                    vx = *(const Vec16 *)(v + key * v_row + (long long)kv_head * D + chunk * 8);
                }
                *(Vec16 *)(ks + r * STRIDE + chunk * 8) = kx;
                *(Vec16 *)(vs + r * STRIDE + chunk * 8) = vx;
            }
            __syncthreads();
        }

        // scores: 16 rows × 64 keys per warp, eight 16×8 fragments; the keys' B fragments of two
        // neighbouring fragments per load (lanes 0-15: keys 8n.., columns c and c + 8; lanes
        // 16-31: keys 8n + 8.., the same columns)
        float sc[KEYS / 8][4];
        #pragma unroll
        for (int n = 0; n < KEYS / 8; ++n) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) sc[n][i] = 0.0f;
        }
        const u16 *key_row = ks + ((lane & 7) + ((lane >> 4) << 3)) * STRIDE + ((lane >> 3) & 1) * 8;
        #pragma unroll
        for (int n = 0; n < KEYS / 8; n += 2) {
            #pragma unroll
            for (int c = 0; c < D / 16; ++c) {
                u32 b[4];
                ldmatrix_x4(b, key_row + n * 8 * STRIDE + c * 16);
                mma<BF16>(sc[n], qa[c], b[0], b[1]);
                mma<BF16>(sc[n + 1], qa[c], b[2], b[3]);
            }
        }

        // scale (in log2 units), mask, and the new row maxima
        float tile_max[2] = {NEG_INF, NEG_INF};
        #pragma unroll
        for (int n = 0; n < KEYS / 8; ++n) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1;
                const long long key = key0 + n * 8 + 2 * quad + (i & 1);
                const bool visible =
                    key < t && (causal_offset < 0 || key <= query[h] + causal_offset);
                const float x = visible ? sc[n][i] * scale_log2 : NEG_INF;
                sc[n][i] = x;
                tile_max[h] = fmaxf(tile_max[h], x);
            }
        }
        float correction[2], base[2];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            float m = tile_max[h];
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float new_max = fmaxf(row_max[h], m);
            // a row that has seen no visible key yet keeps max -inf: its probabilities are 0
            base[h] = new_max == NEG_INF ? 0.0f : new_max;
            correction[h] = fast_exp2(row_max[h] - base[h]);
            row_max[h] = new_max;
            row_sum[h] *= correction[h];
        }
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= correction[0];
            acc[n][1] *= correction[0];
            acc[n][2] *= correction[1];
            acc[n][3] *= correction[1];
        }

        if (FLASH_ASYNC) {
            // every warp is done with this tile's keys: the next tile's may land during p·v
            __syncthreads();
            if (key0 + KEYS < key_end) stage_async<D>(ks, k, key0 + KEYS, t, k_row, kv_head);
            cp_async_commit();   // (empty on the last tile, which keeps the count uniform)
            cp_async_wait<1>();  // this tile's values
            __syncthreads();
        }

        // probabilities, and p·v: the score fragments of keys 16j..16j+15 are the A fragment of
        // the product's k-step j
        #pragma unroll
        for (int j = 0; j < KEYS / 16; ++j) {
            float p[2][4];
            #pragma unroll
            for (int half = 0; half < 2; ++half) {
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float e = fast_exp2(sc[2 * j + half][i] - base[i >> 1]);
                    p[half][i] = e;
                    row_sum[i >> 1] += e;
                }
            }
            const u32 pa[4] = {pack<BF16>(p[0][0], p[0][1]), pack<BF16>(p[0][2], p[0][3]),
                               pack<BF16>(p[1][0], p[1][1]), pack<BF16>(p[1][2], p[1][3])};
            // values of keys 16j.. as B fragments, 16 columns per load: lanes 0-15 address the
            // 16 key rows at column n, lanes 16-31 the same rows at column n + 8
            const u16 *value_row = vs + (j * 16 + (lane & 15)) * STRIDE + (lane >> 4) * 8;
            #pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                u32 b[4];
                ldmatrix_x4_trans(b, value_row + n * 16);
                mma<BF16>(acc[2 * n], pa, b[0], b[1]);
                mma<BF16>(acc[2 * n + 1], pa, b[2], b[3]);
            }
        }
    }

    // normalise and write: the quad's four lanes hold the row's partial sums
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = row_sum[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        row_sum[h] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!live[h]) continue;
        u16 *dst = out + query[h] * out_row + (long long)head[h] * D + 2 * quad;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            *(u32 *)(dst + n * 8) =
                pack<BF16>(acc[n][2 * h] * row_sum[h], acc[n][2 * h + 1] * row_sum[h]);
        }
    }
}

#define FLASH_KERNEL(D, NAME, BF16)                                                                \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, (D) <= 80 ? 3 : 2)                   \
        flash_attention_##NAME##_d##D(const u16 *q, const u16 *k, const u16 *v, u16 *out, int s, \
                                      int t, int rep, long long q_row, long long k_row,           \
                                      long long v_row, long long out_row, float scale_log2,       \
                                      long long causal_offset) {                                   \
        flash_attention<D, BF16>(q, k, v, out, s, t, rep, q_row, k_row, v_row, out_row,          \
                                 scale_log2, causal_offset);                                       \
    }

FLASH_KERNEL(16, bf16, true)
FLASH_KERNEL(32, bf16, true)
FLASH_KERNEL(64, bf16, true)
FLASH_KERNEL(80, bf16, true)
FLASH_KERNEL(96, bf16, true)
FLASH_KERNEL(128, bf16, true)
FLASH_KERNEL(16, f16, false)
FLASH_KERNEL(32, f16, false)
FLASH_KERNEL(64, f16, false)
FLASH_KERNEL(80, f16, false)
FLASH_KERNEL(96, f16, false)
FLASH_KERNEL(128, f16, false)
