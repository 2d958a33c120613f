// Causal self-attention on tensor cores (TF32 mma.sync m16n8k8, fp32 accumulate): the same
// inputs, outputs and FlashAttention-2 math as attention.cu, used when TF32 matmuls are allowed
// and the head size has an entry point below. The (T,T) scores never reach global memory.
//
// A block has TC_WARPS warps; each warp owns 16 rows (queries in forward and dq, keys in dk/dv)
// and keeps its row operands as mma fragments in registers. The block streams TC_TILE rows of
// the other side (keys/values, or queries/dy) through shared memory, rounded to TF32 once on
// load. Fragment layout (PTX ISA, m16n8k8 .tf32): lane = 4*g + t; A (16x8) a0..a3 at
// (g,t) (g+8,t) (g,t+4) (g+8,t+4); B (8x8) b0,b1 at (t,g) (t+4,g); C (16x8) c0..c3 at
// (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1).
// A C-layout score tile becomes the A operand of the next product without shuffles by
// permuting the 8 keys of a k-step: A column t holds key 2t and column t+4 key 2t+1, so
// a = {c0, c2, c1, c3}, and the B rows are read in the same order (rows 2t and 2t+1).
// Softmax runs in base 2: the scores are pre-multiplied by scale*log2(e).
// Backward is split like attention.cu (dq kernel over keys, dk/dv kernel over queries), so
// every output element has one writer: no atomics, deterministic. delta comes from
// attention.cu's attention_backward_delta.
// Launch: block TC_WARPS*32 threads, grid (ceil(T/TC_ROWS), B*NH).

#define TC_WARPS 4
#define TC_ROWS (TC_WARPS * 16)
#define TC_TILE 64
#define TC_FULL 0xffffffffu
#define TC_NEG_INF __int_as_float(0xff800000)
#define TC_POS_INF __int_as_float(0x7f800000)
#define TC_LOG2E 1.4426950408889634f
#define TC_LN2 0.6931471805599453f

__device__ __forceinline__ unsigned tc_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// d += a (16x8) * b (8x8)
__device__ __forceinline__ void tc_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned tc_bits(float x) { return __float_as_uint(x); }

// Zero a warp's N accumulator tiles (C layout, 4 per thread).
template <int N>
__device__ __forceinline__ void tc_zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// Shared tile rows [r0, r0+TC_TILE) of a (T, HS) head slice with row stride `stride`, rounded
// to TF32; rows past T are zero. Rows are padded by 4 floats so that the fragment reads of a
// warp (8 rows x 4 columns, or 4 row pairs x 8 columns) hit 32 distinct banks.
template <int HS>
__device__ void tc_load_tile(float (*tile)[HS + 4], const float* src, long long stride, int r0, int T) {
    constexpr int V = HS / 4;
    for (int e = threadIdx.x; e < TC_TILE * V; e += blockDim.x) {
        int r = e / V, c = (e % V) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < T) x = *reinterpret_cast<const float4*>(src + (long long)(r0 + r) * stride + c);
        float4 out;
        out.x = __uint_as_float(tc_tf32(x.x));
        out.y = __uint_as_float(tc_tf32(x.y));
        out.z = __uint_as_float(tc_tf32(x.z));
        out.w = __uint_as_float(tc_tf32(x.w));
        *reinterpret_cast<float4*>(&tile[r][c]) = out;
    }
}

// Keys and values j0.. of one head (base = its q columns in qkv) into ks and vs, between two
// barriers: the previous tile is consumed before, the new one is complete after.
template <int HS>
__device__ void tc_load_keys_values(float (*ks)[HS + 4], float (*vs)[HS + 4], const float* base, int C,
                                    int j0, int T) {
    __syncthreads();
    tc_load_tile<HS>(ks, base + C, 3LL * C, j0, T);
    tc_load_tile<HS>(vs, base + 2 * C, 3LL * C, j0, T);
    __syncthreads();
}

// A fragments (16 rows x HS) of a warp's rows row0.. of a head slice, times `mul`, from global
// memory; rows past T are zero.
template <int HS>
__device__ void tc_load_rows(unsigned (&a)[HS / 8][4], const float* src, long long stride, int row0,
                             int T, float mul) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const float* r_lo = src + (long long)(row0 + g) * stride;
    const float* r_hi = r_lo + 8 * stride;
    bool lo = row0 + g < T, hi = row0 + g + 8 < T;
#pragma unroll
    for (int k = 0; k < HS / 8; k++) {
        a[k][0] = tc_tf32(lo ? r_lo[k * 8 + t] * mul : 0.0f);
        a[k][1] = tc_tf32(hi ? r_hi[k * 8 + t] * mul : 0.0f);
        a[k][2] = tc_tf32(lo ? r_lo[k * 8 + t + 4] * mul : 0.0f);
        a[k][3] = tc_tf32(hi ? r_hi[k * 8 + t + 4] * mul : 0.0f);
    }
}

// acc (16 x 8 columns n0..n0+7 of the tile's rows) += A (16 x HS) . tile[n0.., :]^T
template <int HS>
__device__ __forceinline__ void tc_dot_rows(float (&acc)[4], const unsigned (&a)[HS / 8][4],
                                            const float (*tile)[HS + 4], int n0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int k = 0; k < HS / 8; k++)
        tc_mma(acc, a[k], tc_bits(tile[n0 + g][k * 8 + t]), tc_bits(tile[n0 + g][k * 8 + t + 4]));
}

// s[n] (16 x 8 columns n*8.. of the tile's rows) = A (16 x HS) . tile^T for the whole tile, with
// the k-steps outermost so that the TC_TILE/8 accumulators form independent mma chains.
template <int HS>
__device__ __forceinline__ void tc_scores(float (&s)[TC_TILE / 8][4], const unsigned (&a)[HS / 8][4],
                                          const float (*tile)[HS + 4]) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    tc_zero(s);
#pragma unroll
    for (int k = 0; k < HS / 8; k++)
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++)
            tc_mma(s[n], a[k], tc_bits(tile[n * 8 + g][k * 8 + t]), tc_bits(tile[n * 8 + g][k * 8 + t + 4]));
}

// out (16 x HS) += P (16 x 8 tile rows k0..k0+7, C layout) . tile[k0..k0+7, :]
template <int HS>
__device__ __forceinline__ void tc_accumulate(float (&out)[HS / 8][4], const float (&p)[4],
                                              const float (*tile)[HS + 4], int k0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const unsigned a[4] = {tc_tf32(p[0]), tc_tf32(p[2]), tc_tf32(p[1]), tc_tf32(p[3])};
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
        tc_mma(out[n], a, tc_bits(tile[k0 + 2 * t][n * 8 + g]), tc_bits(tile[k0 + 2 * t + 1][n * 8 + g]));
}

// The (batch, head) of this block, from blockIdx.y = b*NH + h, and this thread's place in its warp.
struct TcHead {
    int C;            // NH * HS
    long long C3;     // row stride of qkv
    const float* qkv; // head slice: q at qkv[t*C3 + d], k at + C, v at + 2C
    long long y_off;  // where the head's (T, HS) slice starts in a (B,T,C) array (y, dy)
    int warp, g, t;   // lane = 4*g + t
};

template <int HS>
__device__ TcHead tc_head(const float* qkv, int T, int NH) {
    TcHead a;
    a.C = NH * HS;
    a.C3 = 3LL * a.C;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    a.qkv = qkv + (long long)b * T * a.C3 + h * HS;
    a.y_off = (long long)b * T * a.C + h * HS;
    a.warp = threadIdx.x / 32;
    a.g = (threadIdx.x % 32) / 4;
    a.t = threadIdx.x % 4;
    return a;
}

// Rows row0+g and row0+g+8 (< T) of out[n] (C layout), times mul, to dst (row stride `stride`).
template <int HS>
__device__ void tc_store_rows(float* dst, long long stride, const float (&out)[HS / 8][4], int row0,
                              int T, float mul_lo, float mul_hi) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = row0 + g + 8 * half;
        if (row >= T) continue;
        float mul = half ? mul_hi : mul_lo;
        float* d = dst + (long long)row * stride;
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *reinterpret_cast<float2*>(d + n * 8 + 2 * t) =
                make_float2(out[n][2 * half] * mul, out[n][2 * half + 1] * mul);
    }
}

template <int HS>
__device__ void tc_forward(float* y, float* lse, const float* qkv, int T, int NH, float scale) {
    __shared__ __align__(16) float ks[TC_TILE][HS + 4];
    __shared__ __align__(16) float vs[TC_TILE][HS + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int C = a.C, g = a.g, t = a.t;
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;  // longest rows first
    int w0 = i0 + a.warp * 16;                        // this warp's first query
    const float* base = a.qkv;
    unsigned qa[HS / 8][4];
    tc_load_rows<HS>(qa, base, a.C3, w0, T, scale * TC_LOG2E);
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[HS / 8][4];
    tc_zero(o);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        tc_load_keys_values<HS>(ks, vs, base, C, j0, T);
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
        float s[TC_TILE / 8][4];
        tc_scores<HS>(s, qa, ks);
        float mx[2] = {m[0], m[1]};
        bool diagonal = j0 + TC_TILE - 1 > w0;  // warp-uniform: some key is past some row
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
            if (diagonal)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = j0 + n * 8 + 2 * t + (e & 1), row = w0 + g + 8 * (e >> 1);
                    if (key > row) s[n][e] = TC_NEG_INF;
                }
            mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(TC_FULL, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(TC_FULL, mx[r], 2));
            if (mx[r] == TC_NEG_INF) mx[r] = 0.0f;  // a row with no key yet (a padding row): p = 0
            corr[r] = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr[r];  // l is this thread's partial sum; the group's 4 are added at the end
        }
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = exp2f(s[n][e] - m[e >> 1]);
            l[0] += s[n][0] + s[n][1];
            l[1] += s[n][2] + s[n][3];
            tc_accumulate<HS>(o, s[n], vs, n * 8);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 1);
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 2);
    }
    tc_store_rows<HS>(y + a.y_off, C, o, w0, T, 1.0f / l[0], 1.0f / l[1]);
    if (t == 0)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int row = w0 + g + 8 * r;
            if (row < T) lse[(long long)blockIdx.y * T + row] = (m[r] + log2f(l[r])) * TC_LN2;
        }
}

// dq_i = scale * sum_j p_ij (dy_i . v_j - delta_i) k_j over keys j <= i.
template <int HS>
__device__ void tc_backward_dq(float* dqkv, const float* qkv, const float* dy, const float* lse,
                               const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) float ks[TC_TILE][HS + 4];
    __shared__ __align__(16) float vs[TC_TILE][HS + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int C = a.C, g = a.g, t = a.t;
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    int w0 = i0 + a.warp * 16;
    const float* base = a.qkv;
    unsigned qa[HS / 8][4], da[HS / 8][4];
    tc_load_rows<HS>(qa, base, a.C3, w0, T, scale * TC_LOG2E);
    tc_load_rows<HS>(da, dy + a.y_off, C, w0, T, 1.0f);
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = w0 + g + 8 * r;
        lse2[r] = row < T ? lse[(long long)blockIdx.y * T + row] * TC_LOG2E : 0.0f;
        dl[r] = row < T ? delta[(long long)blockIdx.y * T + row] : 0.0f;
    }
    float dq[HS / 8][4];
    tc_zero(dq);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        tc_load_keys_values<HS>(ks, vs, base, C, j0, T);
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            tc_dot_rows<HS>(s, qa, ks, n * 8);
            tc_dot_rows<HS>(dp, da, vs, n * 8);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = j0 + n * 8 + 2 * t + (e & 1), row = w0 + g + 8 * (e >> 1);
                float p = key > row ? 0.0f : exp2f(s[e] - lse2[e >> 1]);
                s[e] = p * (dp[e] - dl[e >> 1]);  // ds
            }
            tc_accumulate<HS>(dq, s, ks, n * 8);
        }
    }
    tc_store_rows<HS>(dqkv + (base - qkv), a.C3, dq, w0, T, scale, scale);
}

// dv_j = sum_i p_ij dy_i,  dk_j = scale * sum_i p_ij (dy_i . v_j - delta_i) q_i over queries i >= j.
template <int HS>
__device__ void tc_backward_dkv(float* dqkv, const float* qkv, const float* dy, const float* lse,
                                const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) float qs[TC_TILE][HS + 4];
    __shared__ __align__(16) float dys[TC_TILE][HS + 4];
    __shared__ float lse2s[TC_TILE], dls[TC_TILE];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int C = a.C, g = a.g, t = a.t;
    long long C3 = a.C3;
    int j0 = blockIdx.x * TC_ROWS;  // the first blocks see the most queries
    int w0 = j0 + a.warp * 16;      // this warp's first key
    const float* base = a.qkv;
    const float* dybase = dy + a.y_off;
    unsigned ka[HS / 8][4], va[HS / 8][4];
    tc_load_rows<HS>(ka, base + C, C3, w0, T, scale * TC_LOG2E);
    tc_load_rows<HS>(va, base + 2 * C, C3, w0, T, 1.0f);
    float dk[HS / 8][4], dv[HS / 8][4];
    tc_zero(dk);
    tc_zero(dv);
    for (int it = j0; it < T; it += TC_TILE) {
        __syncthreads();
        tc_load_tile<HS>(qs, base, C3, it, T);
        tc_load_tile<HS>(dys, dybase, C, it, T);
        for (int r = threadIdx.x; r < TC_TILE; r += blockDim.x) {
            int i = it + r;  // a query past T gets lse = +inf, so p = 0
            lse2s[r] = i < T ? lse[(long long)blockIdx.y * T + i] * TC_LOG2E : TC_POS_INF;
            dls[r] = i < T ? delta[(long long)blockIdx.y * T + i] : 0.0f;
        }
        __syncthreads();
        if (it + TC_TILE - 1 < w0) continue;  // warp-uniform: every query is before this warp's keys
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            tc_dot_rows<HS>(s, ka, qs, n * 8);   // s^T: rows keys, columns queries
            tc_dot_rows<HS>(dp, va, dys, n * 8);
            float ds[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int q = n * 8 + 2 * t + (e & 1), key = w0 + g + 8 * (e >> 1);
                float p = it + q < key ? 0.0f : exp2f(s[e] - lse2s[q]);
                ds[e] = p * (dp[e] - dls[q]);
                s[e] = p;
            }
            tc_accumulate<HS>(dv, s, dys, n * 8);
            tc_accumulate<HS>(dk, ds, qs, n * 8);
        }
    }
    float* out = dqkv + (base - qkv);
    tc_store_rows<HS>(out + C, C3, dk, w0, T, scale, scale);
    tc_store_rows<HS>(out + 2 * C, C3, dv, w0, T, 1.0f, 1.0f);
}

// One set of entry points per supported head size (the fragments live in registers, so HS is a
// compile-time constant); llmpi/gpu_ops.py falls back to attention.cu for other sizes.
#define TC_ENTRY_POINTS(HS)                                                                            \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_forward_tc##HS(float* y, float* lse, const float* qkv, int T, int NH, float scale) {     \
        tc_forward<HS>(y, lse, qkv, T, NH, scale);                                                     \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dq_tc##HS(float* dqkv, const float* qkv, const float* dy, const float* lse,     \
                                 const float* delta, int T, int NH, float scale) {                     \
        tc_backward_dq<HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                                   \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dkv_tc##HS(float* dqkv, const float* qkv, const float* dy, const float* lse,    \
                                  const float* delta, int T, int NH, float scale) {                    \
        tc_backward_dkv<HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                                  \
    }

TC_ENTRY_POINTS(16)
TC_ENTRY_POINTS(32)
TC_ENTRY_POINTS(64)
