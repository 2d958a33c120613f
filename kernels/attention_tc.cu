// Causal self-attention on tensor cores: the same inputs, outputs and FlashAttention-2 math as
// attention.cu, in two precisions:
// - TF32 (mma.sync m16n8k8, entry points *_tc<HS>): when TF32 matmuls are allowed (CUPY_TF32=1);
// - bf16 (mma.sync m16n8k16, entry points *_bf16_<HS>): for model.dtype = "bf16". q, k, v and dy
//   stay float32 in global memory and are rounded to bf16 (nearest even) where they enter a
//   product, as are the probabilities P and dS before theirs.
// Scores, softmax statistics and every accumulator are float32 in both. The (T,T) scores never
// reach global memory.
//
// A block has TC_WARPS warps; each warp owns 16 rows (queries in forward and dq, keys in dk/dv)
// and keeps its row operands as mma fragments in registers. The block streams TC_TILE rows of
// the other side (keys/values, or queries/dy) through shared memory, rounded once on load.
// Fragment layouts (PTX ISA; lane = 4*g + t; C is the same for both shapes):
//   C (16x8, f32):        c0..c3 at (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1)
//   TF32 A (16x8):        a0..a3 at (g,t) (g+8,t) (g,t+4) (g+8,t+4); B (8x8) b0,b1 at (t,g) (t+4,g)
//   bf16 A (16x16):       4 registers of 2 bf16 (lower column in the low half): (g, 2t..2t+1),
//                         (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9)
//   bf16 B (16x8):        2 registers: rows 2t..2t+1 and rows 2t+8..2t+9 of column g
// A C-layout score tile becomes the A operand of the next product without shuffles. TF32:
// permuting the 8 keys of a k-step (A column t holds key 2t and column t+4 key 2t+1, so
// a = {c0, c2, c1, c3}, and the B rows are read in the same order). bf16: two C tiles side by
// side are one A fragment as they are ({c0,c1}, {c2,c3} of the first, then of the second).
// bf16 tiles are 32-bit words of two bf16, so that a B register is one shared-memory read: a
// product that contracts over the head dimension reads a row-major tile ([row][d pair]), one
// that contracts over rows (P.V, dS.K, P^T.dY, dS^T.Q) reads a transposed tile ([d][row pair]).
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

// Two floats as bf16x2 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ unsigned bw_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// d += a (16x16) * b (16x8), bf16 inputs
__device__ __forceinline__ void bw_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

// bf16 tiles: rows r0 .. r0+TC_TILE-1 of a (T, HS) float32 head slice (row stride `stride`),
// rounded to bf16, row-major into `rows` ([row][d/2]) and/or transposed into `cols`
// ([d][row/2]); rows past T are zero; a null target is skipped. Padding: 4 words a row keeps
// the fragment reads (8 rows x 4 words) on 32 distinct banks.
template <int HS>
__device__ void bw_load_tile(unsigned (*rows)[HS / 2 + 4], unsigned (*cols)[TC_TILE / 2 + 4], const float* src,
                             long long stride, int r0, int T) {
    constexpr int Q = HS / 4;  // float4 quads of a row
    for (int e = threadIdx.x; e < (TC_TILE / 2) * Q; e += blockDim.x) {
        int p = e / Q, c = (e % Q) * 4, r = r0 + 2 * p;  // row pair p: rows r, r + 1
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
        if (r < T) x = *reinterpret_cast<const float4*>(src + (long long)r * stride + c);
        if (r + 1 < T) y = *reinterpret_cast<const float4*>(src + (long long)(r + 1) * stride + c);
        if (rows) {
            rows[2 * p][c / 2] = bw_pack(x.x, x.y);
            rows[2 * p][c / 2 + 1] = bw_pack(x.z, x.w);
            rows[2 * p + 1][c / 2] = bw_pack(y.x, y.y);
            rows[2 * p + 1][c / 2 + 1] = bw_pack(y.z, y.w);
        }
        if (cols) {
            cols[c][p] = bw_pack(x.x, y.x);
            cols[c + 1][p] = bw_pack(x.y, y.y);
            cols[c + 2][p] = bw_pack(x.z, y.z);
            cols[c + 3][p] = bw_pack(x.w, y.w);
        }
    }
}

// bf16 A fragments (16 rows x HS, HS/16 k-steps) of a warp's rows row0.. of a head slice, times
// `mul`, from global memory; rows past T are zero.
template <int HS>
__device__ void bw_load_rows(unsigned (&a)[HS / 16][4], const float* src, long long stride, int row0,
                             int T, float mul) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const float* r_lo = src + (long long)(row0 + g) * stride;
    const float* r_hi = r_lo + 8 * stride;
    bool lo = row0 + g < T, hi = row0 + g + 8 < T;
    const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int k = 0; k < HS / 16; k++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {  // columns 2t.. then 2t+8..
            int c = k * 16 + 2 * t + 8 * half;
            float2 x = lo ? *reinterpret_cast<const float2*>(r_lo + c) : zero;
            float2 y = hi ? *reinterpret_cast<const float2*>(r_hi + c) : zero;
            a[k][2 * half] = bw_pack(x.x * mul, x.y * mul);
            a[k][2 * half + 1] = bw_pack(y.x * mul, y.y * mul);
        }
    }
}

// s[n] (16 x 8 tile rows (n0+n)*8..) = A (16 x HS) . rows^T for N consecutive 8-row groups,
// k-steps outermost (N independent mma chains).
template <int HS, int N>
__device__ __forceinline__ void bw_scores(float (&s)[N][4], const unsigned (&a)[HS / 16][4],
                                          const unsigned (*rows)[HS / 2 + 4], int n0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    tc_zero(s);
#pragma unroll
    for (int k = 0; k < HS / 16; k++)
#pragma unroll
        for (int n = 0; n < N; n++)
            bw_mma(s[n], a[k], rows[(n0 + n) * 8 + g][8 * k + t], rows[(n0 + n) * 8 + g][8 * k + t + 4]);
}

// out (16 x HS) += P (16 x 16 tile rows k0.., the C tiles p_lo | p_hi) . tile[k0..k0+15, :],
// read from the transposed tile.
template <int HS>
__device__ __forceinline__ void bw_accumulate(float (&out)[HS / 8][4], const float (&p_lo)[4],
                                              const float (&p_hi)[4], const unsigned (*cols)[TC_TILE / 2 + 4],
                                              int k0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const unsigned a[4] = {bw_pack(p_lo[0], p_lo[1]), bw_pack(p_lo[2], p_lo[3]), bw_pack(p_hi[0], p_hi[1]),
                           bw_pack(p_hi[2], p_hi[3])};
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
        bw_mma(out[n], a, cols[n * 8 + g][k0 / 2 + t], cols[n * 8 + g][k0 / 2 + t + 4]);
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

// Forward, one tile of scores s (16 rows from w0 x TC_TILE keys from j0, C layout): mask the
// keys past each row, update the running max m and this thread's partial sums l, rescale the
// output o, and leave the unnormalized probabilities in s.
template <int HS>
__device__ __forceinline__ void tc_online_softmax(float (&s)[TC_TILE / 8][4], float (&m)[2], float (&l)[2],
                                                  float (&o)[HS / 8][4], int j0, int w0) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
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
    }
}

// Forward, after the last tile: y rows = o / l, and lse = m + log(l) per row (natural log).
template <int HS>
__device__ void tc_finish_forward(float* y, int C, float* lse_bh, const float (&o)[HS / 8][4], const float (&m)[2],
                                  float (&l)[2], int w0, int T) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 1);
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 2);
    }
    tc_store_rows<HS>(y, C, o, w0, T, 1.0f / l[0], 1.0f / l[1]);
    if (t == 0)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int row = w0 + g + 8 * r;
            if (row < T) lse_bh[row] = (m[r] + log2f(l[r])) * TC_LN2;
        }
}

// dq: lse (base 2) and delta of this thread's rows w0+g and w0+g+8.
__device__ void tc_row_stats(float (&lse2)[2], float (&dl)[2], const float* lse_bh, const float* delta_bh,
                             int w0, int T) {
    int g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = w0 + g + 8 * r;
        lse2[r] = row < T ? lse_bh[row] * TC_LOG2E : 0.0f;
        dl[r] = row < T ? delta_bh[row] : 0.0f;
    }
}

// dq: scores s and dp of 8 keys from key0 (C layout) -> ds = p * (dp - delta) in s.
__device__ __forceinline__ void tc_dq_ds(float (&s)[4], const float (&dp)[4], int key0, int w0,
                                         const float (&lse2)[2], const float (&dl)[2]) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        int key = key0 + 2 * t + (e & 1), row = w0 + g + 8 * (e >> 1);
        float p = key > row ? 0.0f : exp2f(s[e] - lse2[e >> 1]);
        s[e] = p * (dp[e] - dl[e >> 1]);
    }
}

// dk/dv: lse (base 2) and delta of the tile's queries it.. into shared memory; a query past T
// gets lse = +inf, so p = 0.
__device__ void tc_load_query_stats(float* lse2s, float* dls, const float* lse_bh, const float* delta_bh, int it,
                                    int T) {
    for (int r = threadIdx.x; r < TC_TILE; r += blockDim.x) {
        int i = it + r;
        lse2s[r] = i < T ? lse_bh[i] * TC_LOG2E : TC_POS_INF;
        dls[r] = i < T ? delta_bh[i] : 0.0f;
    }
}

// dk/dv: transposed scores s^T and dp^T of this warp's keys x 8 queries from tile column q0
// (C layout) -> p in s, ds = p * (dp - delta) in ds.
__device__ __forceinline__ void tc_dkv_p_ds(float (&s)[4], const float (&dp)[4], float (&ds)[4], int q0, int it,
                                            int w0, const float* lse2s, const float* dls) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        int q = q0 + 2 * t + (e & 1), key = w0 + g + 8 * (e >> 1);
        float p = it + q < key ? 0.0f : exp2f(s[e] - lse2s[q]);
        ds[e] = p * (dp[e] - dls[q]);
        s[e] = p;
    }
}

// ---- TF32 --------------------------------------------------------------------------------------

template <int HS>
__device__ void tc_forward(float* y, float* lse, const float* qkv, int T, int NH, float scale) {
    __shared__ __align__(16) float ks[TC_TILE][HS + 4];
    __shared__ __align__(16) float vs[TC_TILE][HS + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;  // longest rows first
    int w0 = i0 + a.warp * 16;                        // this warp's first query
    unsigned qa[HS / 8][4];
    tc_load_rows<HS>(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[HS / 8][4];
    tc_zero(o);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        tc_load_keys_values<HS>(ks, vs, a.qkv, a.C, j0, T);
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
        float s[TC_TILE / 8][4];
        tc_scores<HS>(s, qa, ks);
        tc_online_softmax<HS>(s, m, l, o, j0, w0);
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) tc_accumulate<HS>(o, s[n], vs, n * 8);
    }
    tc_finish_forward<HS>(y + a.y_off, a.C, lse + (long long)blockIdx.y * T, o, m, l, w0, T);
}

// dq_i = scale * sum_j p_ij (dy_i . v_j - delta_i) k_j over keys j <= i.
template <int HS>
__device__ void tc_backward_dq(float* dqkv, const float* qkv, const float* dy, const float* lse,
                               const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) float ks[TC_TILE][HS + 4];
    __shared__ __align__(16) float vs[TC_TILE][HS + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    int w0 = i0 + a.warp * 16;
    unsigned qa[HS / 8][4], da[HS / 8][4];
    tc_load_rows<HS>(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    tc_load_rows<HS>(da, dy + a.y_off, a.C, w0, T, 1.0f);
    float lse2[2], dl[2];
    tc_row_stats(lse2, dl, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, w0, T);
    float dq[HS / 8][4];
    tc_zero(dq);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        tc_load_keys_values<HS>(ks, vs, a.qkv, a.C, j0, T);
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            tc_dot_rows<HS>(s, qa, ks, n * 8);
            tc_dot_rows<HS>(dp, da, vs, n * 8);
            tc_dq_ds(s, dp, j0 + n * 8, w0, lse2, dl);
            tc_accumulate<HS>(dq, s, ks, n * 8);
        }
    }
    tc_store_rows<HS>(dqkv + (a.qkv - qkv), a.C3, dq, w0, T, scale, scale);
}

// dv_j = sum_i p_ij dy_i,  dk_j = scale * sum_i p_ij (dy_i . v_j - delta_i) q_i over queries i >= j.
template <int HS>
__device__ void tc_backward_dkv(float* dqkv, const float* qkv, const float* dy, const float* lse,
                                const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) float qs[TC_TILE][HS + 4];
    __shared__ __align__(16) float dys[TC_TILE][HS + 4];
    __shared__ float lse2s[TC_TILE], dls[TC_TILE];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int j0 = blockIdx.x * TC_ROWS;  // the first blocks see the most queries
    int w0 = j0 + a.warp * 16;      // this warp's first key
    unsigned ka[HS / 8][4], va[HS / 8][4];
    tc_load_rows<HS>(ka, a.qkv + a.C, a.C3, w0, T, scale * TC_LOG2E);
    tc_load_rows<HS>(va, a.qkv + 2 * a.C, a.C3, w0, T, 1.0f);
    float dk[HS / 8][4], dv[HS / 8][4];
    tc_zero(dk);
    tc_zero(dv);
    for (int it = j0; it < T; it += TC_TILE) {
        __syncthreads();
        tc_load_tile<HS>(qs, a.qkv, a.C3, it, T);
        tc_load_tile<HS>(dys, dy + a.y_off, a.C, it, T);
        tc_load_query_stats(lse2s, dls, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, it, T);
        __syncthreads();
        if (it + TC_TILE - 1 < w0) continue;  // warp-uniform: every query is before this warp's keys
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n++) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ds[4];
            tc_dot_rows<HS>(s, ka, qs, n * 8);  // s^T: rows keys, columns queries
            tc_dot_rows<HS>(dp, va, dys, n * 8);
            tc_dkv_p_ds(s, dp, ds, n * 8, it, w0, lse2s, dls);
            tc_accumulate<HS>(dv, s, dys, n * 8);
            tc_accumulate<HS>(dk, ds, qs, n * 8);
        }
    }
    float* out = dqkv + (a.qkv - qkv);
    tc_store_rows<HS>(out + a.C, a.C3, dk, w0, T, scale, scale);
    tc_store_rows<HS>(out + 2 * a.C, a.C3, dv, w0, T, 1.0f, 1.0f);
}

// ---- bf16 --------------------------------------------------------------------------------------
// The same three kernels on bf16 fragments: scores in pairs of 8-row groups (16 keys or queries
// make one A fragment), the products over rows from the transposed tiles.

template <int HS>
__device__ void bw_forward(float* y, float* lse, const float* qkv, int T, int NH, float scale) {
    __shared__ __align__(16) unsigned ks[TC_TILE][HS / 2 + 4];
    __shared__ __align__(16) unsigned vt[HS][TC_TILE / 2 + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;  // longest rows first
    int w0 = i0 + a.warp * 16;
    unsigned qa[HS / 16][4];
    bw_load_rows<HS>(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[HS / 8][4];
    tc_zero(o);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        __syncthreads();  // the previous tile is consumed
        bw_load_tile<HS>(ks, nullptr, a.qkv + a.C, a.C3, j0, T);
        bw_load_tile<HS>(nullptr, vt, a.qkv + 2 * a.C, a.C3, j0, T);
        __syncthreads();
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
        float s[TC_TILE / 8][4];
        bw_scores<HS, TC_TILE / 8>(s, qa, ks, 0);
        tc_online_softmax<HS>(s, m, l, o, j0, w0);
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += 2) bw_accumulate<HS>(o, s[n], s[n + 1], vt, n * 8);
    }
    tc_finish_forward<HS>(y + a.y_off, a.C, lse + (long long)blockIdx.y * T, o, m, l, w0, T);
}

template <int HS>
__device__ void bw_backward_dq(float* dqkv, const float* qkv, const float* dy, const float* lse,
                               const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) unsigned ks[TC_TILE][HS / 2 + 4];
    __shared__ __align__(16) unsigned vs[TC_TILE][HS / 2 + 4];
    __shared__ __align__(16) unsigned kt[HS][TC_TILE / 2 + 4];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    int w0 = i0 + a.warp * 16;
    unsigned qa[HS / 16][4], da[HS / 16][4];
    bw_load_rows<HS>(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    bw_load_rows<HS>(da, dy + a.y_off, a.C, w0, T, 1.0f);
    float lse2[2], dl[2];
    tc_row_stats(lse2, dl, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, w0, T);
    float dq[HS / 8][4];
    tc_zero(dq);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        __syncthreads();
        bw_load_tile<HS>(ks, kt, a.qkv + a.C, a.C3, j0, T);
        bw_load_tile<HS>(vs, nullptr, a.qkv + 2 * a.C, a.C3, j0, T);
        __syncthreads();
        if (j0 > w0 + 15) continue;
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += 2) {
            float s[2][4], dp[2][4];
            bw_scores<HS, 2>(s, qa, ks, n);
            bw_scores<HS, 2>(dp, da, vs, n);
            tc_dq_ds(s[0], dp[0], j0 + n * 8, w0, lse2, dl);
            tc_dq_ds(s[1], dp[1], j0 + n * 8 + 8, w0, lse2, dl);
            bw_accumulate<HS>(dq, s[0], s[1], kt, n * 8);
        }
    }
    tc_store_rows<HS>(dqkv + (a.qkv - qkv), a.C3, dq, w0, T, scale, scale);
}

template <int HS>
__device__ void bw_backward_dkv(float* dqkv, const float* qkv, const float* dy, const float* lse,
                                const float* delta, int T, int NH, float scale) {
    __shared__ __align__(16) unsigned qs[TC_TILE][HS / 2 + 4];
    __shared__ __align__(16) unsigned dys[TC_TILE][HS / 2 + 4];
    __shared__ __align__(16) unsigned qt[HS][TC_TILE / 2 + 4];
    __shared__ __align__(16) unsigned dyt[HS][TC_TILE / 2 + 4];
    __shared__ float lse2s[TC_TILE], dls[TC_TILE];
    TcHead a = tc_head<HS>(qkv, T, NH);
    int j0 = blockIdx.x * TC_ROWS;
    int w0 = j0 + a.warp * 16;
    unsigned ka[HS / 16][4], va[HS / 16][4];
    bw_load_rows<HS>(ka, a.qkv + a.C, a.C3, w0, T, scale * TC_LOG2E);
    bw_load_rows<HS>(va, a.qkv + 2 * a.C, a.C3, w0, T, 1.0f);
    float dk[HS / 8][4], dv[HS / 8][4];
    tc_zero(dk);
    tc_zero(dv);
    for (int it = j0; it < T; it += TC_TILE) {
        __syncthreads();
        bw_load_tile<HS>(qs, qt, a.qkv, a.C3, it, T);
        bw_load_tile<HS>(dys, dyt, dy + a.y_off, a.C, it, T);
        tc_load_query_stats(lse2s, dls, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, it, T);
        __syncthreads();
        if (it + TC_TILE - 1 < w0) continue;
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += 2) {
            float s[2][4], dp[2][4], ds[2][4];
            bw_scores<HS, 2>(s, ka, qs, n);  // s^T: rows keys, columns queries
            bw_scores<HS, 2>(dp, va, dys, n);
            tc_dkv_p_ds(s[0], dp[0], ds[0], n * 8, it, w0, lse2s, dls);
            tc_dkv_p_ds(s[1], dp[1], ds[1], n * 8 + 8, it, w0, lse2s, dls);
            bw_accumulate<HS>(dv, s[0], s[1], dyt, n * 8);
            bw_accumulate<HS>(dk, ds[0], ds[1], qt, n * 8);
        }
    }
    float* out = dqkv + (a.qkv - qkv);
    tc_store_rows<HS>(out + a.C, a.C3, dk, w0, T, scale, scale);
    tc_store_rows<HS>(out + 2 * a.C, a.C3, dv, w0, T, 1.0f, 1.0f);
}

// One set of entry points per precision and supported head size (the fragments live in
// registers, so HS is a compile-time constant); llmpi/gpu_ops.py falls back to attention.cu for
// other sizes. PREFIX picks the device functions (tc_ or bw_), NAME the entry-point suffix.
#define TC_ENTRY_POINTS(PREFIX, NAME, HS)                                                              \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_forward_##NAME##HS(float* y, float* lse, const float* qkv, int T, int NH, float scale) { \
        PREFIX##forward<HS>(y, lse, qkv, T, NH, scale);                                                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dq_##NAME##HS(float* dqkv, const float* qkv, const float* dy, const float* lse, \
                                     const float* delta, int T, int NH, float scale) {                 \
        PREFIX##backward_dq<HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                              \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dkv_##NAME##HS(float* dqkv, const float* qkv, const float* dy, const float* lse,\
                                      const float* delta, int T, int NH, float scale) {                \
        PREFIX##backward_dkv<HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                             \
    }

TC_ENTRY_POINTS(tc_, tc, 16)
TC_ENTRY_POINTS(tc_, tc, 32)
TC_ENTRY_POINTS(tc_, tc, 64)
TC_ENTRY_POINTS(bw_, bf16_, 16)
TC_ENTRY_POINTS(bw_, bf16_, 32)
TC_ENTRY_POINTS(bw_, bf16_, 64)
