// Causal self-attention on tensor cores: the same inputs, outputs and FlashAttention-2 math as
// attention.cu, in two precisions:
// - TF32 (mma.sync m16n8k8, entry points *_tc<HS>): when TF32 matmuls are allowed (CUPY_TF32=1);
// - bf16 (mma.sync m16n8k16): for model.dtype = "bf16", with q, k, v and dy rounded to bf16
//   (nearest even) where they enter a product, as are the probabilities P and dS before theirs.
//   Two storages: float32 arrays (entry points *_bf16_<HS>: the tensor-parallel layers' float32
//   activations), or bf16 arrays (*_bf16io_<HS>: bf16 activations, read and written as they are,
//   so no widening pass before the kernels and no rounding pass after them).
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
// The three kernels are written once, over a precision struct (Tf32, Bf16) that supplies the
// fragments, the tiles and the two products.
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

#include "bf16.cuh"

// Where q, k, v, dy, y and dq/dk/dv live in global memory: only loads and stores differ.
struct TcF32Io {
    typedef float T;
    static __device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
    static __device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
    static __device__ __forceinline__ void store2(float* p, float x, float y) {
        *reinterpret_cast<float2*>(p) = make_float2(x, y);
    }
};

// bf16 bits: a pair is one 32-bit word, four one 64-bit word (element 2k in the low half of word k)
struct TcBf16Io {
    typedef bf16_t T;
    static __device__ __forceinline__ float2 load2(const bf16_t* p) {
        unsigned w = *reinterpret_cast<const unsigned*>(p);
        return make_float2(bf16_lo(w), bf16_hi(w));
    }
    static __device__ __forceinline__ float4 load4(const bf16_t* p) {
        uint2 w = *reinterpret_cast<const uint2*>(p);
        return make_float4(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
    }
    static __device__ __forceinline__ void store2(bf16_t* p, float x, float y) {
        *reinterpret_cast<unsigned*>(p) = bf16_pair(x, y);
    }
};

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

// ---- the two precisions -------------------------------------------------------------------------
// Each is a struct of the head size HS with what the kernels below need of a number format:
//   Frag                  a warp's 16 rows x HS as A fragments (registers)
//   Tile<ROWS, COLS>      TC_TILE rows of a head slice in shared memory, as the B operand of a
//                         product over the head dimension (ROWS: scores) and/or over the rows
//                         (COLS: P.V, dS.K, P^T.dY, dS^T.Q)
//   load_rows(a, src, stride, row0, T, mul)   a's rows row0.. (times mul) from global memory
//   load(tile, src, stride, r0, T)            tile rows r0.. from global memory (no barriers)
//   scores<N>(s, a, tile, n0)                 s[n] = a . (tile rows (n0+n)*8 .. +7)^T, n < N
//   GROUP                 8-row groups that make one A fragment of a product over rows (1 or 2)
//   accumulate(out, p, tile, k0)              out += P . tile rows k0 .. k0 + 8*GROUP - 1, P the
//                                             GROUP C tiles p[0..GROUP) side by side
// Rows past T read as zero.

// TF32: one float32 tile, rounded to TF32 on load, serves both directions. Rows are padded by 4
// floats so that the fragment reads of a warp (8 rows x 4 columns, or 4 row pairs x 8 columns)
// hit 32 distinct banks.
template <int HS>
struct __align__(16) TcTf32Tile {
    float v[TC_TILE][HS + 4];
};

template <int HS>
struct Tf32 {
    typedef TcF32Io Io;
    static constexpr int GROUP = 1;
    typedef unsigned Frag[HS / 8][4];
    template <bool ROWS, bool COLS>
    using Tile = TcTf32Tile<HS>;

    static __device__ void load_rows(Frag& a, const float* src, long long stride, int row0, int T, float mul) {
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

    static __device__ void load(TcTf32Tile<HS>& tile, const float* src, long long stride, int r0, int T) {
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
            *reinterpret_cast<float4*>(&tile.v[r][c]) = out;
        }
    }

    // k-steps outermost, so that the N accumulators form independent mma chains
    template <int N>
    static __device__ __forceinline__ void scores(float (&s)[N][4], const Frag& a, const TcTf32Tile<HS>& tile,
                                                  int n0) {
        int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
        tc_zero(s);
#pragma unroll
        for (int k = 0; k < HS / 8; k++)
#pragma unroll
            for (int n = 0; n < N; n++) {
                const float* row = tile.v[(n0 + n) * 8 + g];
                tc_mma(s[n], a[k], tc_bits(row[k * 8 + t]), tc_bits(row[k * 8 + t + 4]));
            }
    }

    // one k-step of 8 tile rows: the C tile p[0] permuted into an A fragment (see the top)
    static __device__ __forceinline__ void accumulate(float (&out)[HS / 8][4], const float (*p)[4],
                                                      const TcTf32Tile<HS>& tile, int k0) {
        int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
        const unsigned a[4] = {tc_tf32(p[0][0]), tc_tf32(p[0][2]), tc_tf32(p[0][1]), tc_tf32(p[0][3])};
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            tc_mma(out[n], a, tc_bits(tile.v[k0 + 2 * t][n * 8 + g]), tc_bits(tile.v[k0 + 2 * t + 1][n * 8 + g]));
    }
};

// bf16: words of two bf16, row-major ([row][d/2]) for ROWS and transposed ([d][row/2]) for
// COLS, so that each B register is one shared-memory read. Padding by 4 words a row keeps the
// fragment reads (8 rows x 4 words) on 32 distinct banks.
template <int HS, bool ROWS, bool COLS>
struct TcBf16Tile;

template <int HS>
struct __align__(16) TcBf16Tile<HS, true, false> {
    unsigned rows[TC_TILE][HS / 2 + 4];
};

template <int HS>
struct __align__(16) TcBf16Tile<HS, false, true> {
    unsigned cols[HS][TC_TILE / 2 + 4];
};

template <int HS>
struct __align__(16) TcBf16Tile<HS, true, true> {
    unsigned rows[TC_TILE][HS / 2 + 4];
    unsigned cols[HS][TC_TILE / 2 + 4];
};

template <int HS, class IO>
struct TcBf16 {
    typedef IO Io;
    typedef typename IO::T E;
    static constexpr int GROUP = 2;
    typedef unsigned Frag[HS / 16][4];
    template <bool ROWS, bool COLS>
    using Tile = TcBf16Tile<HS, ROWS, COLS>;

    static __device__ void load_rows(Frag& a, const E* src, long long stride, int row0, int T, float mul) {
        int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
        const E* r_lo = src + (long long)(row0 + g) * stride;
        const E* r_hi = r_lo + 8 * stride;
        bool lo = row0 + g < T, hi = row0 + g + 8 < T;
        const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
        for (int k = 0; k < HS / 16; k++)
#pragma unroll
            for (int half = 0; half < 2; half++) {  // columns 2t.. then 2t+8..
                int c = k * 16 + 2 * t + 8 * half;
                float2 x = lo ? IO::load2(r_lo + c) : zero;
                float2 y = hi ? IO::load2(r_hi + c) : zero;
                a[k][2 * half] = bw_pack(x.x * mul, x.y * mul);
                a[k][2 * half + 1] = bw_pack(y.x * mul, y.y * mul);
            }
    }

    // a thread takes a row pair and 4 columns, which is what one word of each layout needs
    template <bool ROWS, bool COLS>
    static __device__ void load(Tile<ROWS, COLS>& tile, const E* src, long long stride, int r0, int T) {
        constexpr int Q = HS / 4;
        for (int e = threadIdx.x; e < (TC_TILE / 2) * Q; e += blockDim.x) {
            int p = e / Q, c = (e % Q) * 4, r = r0 + 2 * p;  // rows r and r + 1
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
            if (r < T) x = IO::load4(src + (long long)r * stride + c);
            if (r + 1 < T) y = IO::load4(src + (long long)(r + 1) * stride + c);
            if constexpr (ROWS) {
                tile.rows[2 * p][c / 2] = bw_pack(x.x, x.y);
                tile.rows[2 * p][c / 2 + 1] = bw_pack(x.z, x.w);
                tile.rows[2 * p + 1][c / 2] = bw_pack(y.x, y.y);
                tile.rows[2 * p + 1][c / 2 + 1] = bw_pack(y.z, y.w);
            }
            if constexpr (COLS) {
                tile.cols[c][p] = bw_pack(x.x, y.x);
                tile.cols[c + 1][p] = bw_pack(x.y, y.y);
                tile.cols[c + 2][p] = bw_pack(x.z, y.z);
                tile.cols[c + 3][p] = bw_pack(x.w, y.w);
            }
        }
    }

    template <int N, bool COLS>
    static __device__ __forceinline__ void scores(float (&s)[N][4], const Frag& a, const Tile<true, COLS>& tile,
                                                  int n0) {
        int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
        tc_zero(s);
#pragma unroll
        for (int k = 0; k < HS / 16; k++)
#pragma unroll
            for (int n = 0; n < N; n++) {
                const unsigned* row = tile.rows[(n0 + n) * 8 + g];
                bw_mma(s[n], a[k], row[8 * k + t], row[8 * k + t + 4]);
            }
    }

    // one k-step of 16 tile rows: the C tiles p[0] | p[1] are one A fragment (see the top)
    template <bool ROWS>
    static __device__ __forceinline__ void accumulate(float (&out)[HS / 8][4], const float (*p)[4],
                                                      const Tile<ROWS, true>& tile, int k0) {
        int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
        const unsigned a[4] = {bw_pack(p[0][0], p[0][1]), bw_pack(p[0][2], p[0][3]), bw_pack(p[1][0], p[1][1]),
                               bw_pack(p[1][2], p[1][3])};
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            bw_mma(out[n], a, tile.cols[n * 8 + g][k0 / 2 + t], tile.cols[n * 8 + g][k0 / 2 + t + 4]);
    }
};

template <int HS>
using Bf16 = TcBf16<HS, TcF32Io>;
template <int HS>
using Bf16Io = TcBf16<HS, TcBf16Io>;

// The (batch, head) of this block, from blockIdx.y = b*NH + h, and this thread's place in its warp.
template <class E>
struct TcHead {
    int C;            // NH * HS
    long long C3;     // row stride of qkv
    const E* qkv;     // head slice: q at qkv[t*C3 + d], k at + C, v at + 2C
    long long y_off;  // where the head's (T, HS) slice starts in a (B,T,C) array (y, dy)
    int warp, g, t;   // lane = 4*g + t
};

template <int HS, class E>
__device__ TcHead<E> tc_head(const E* qkv, int T, int NH) {
    TcHead<E> a;
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
template <int HS, class IO>
__device__ void tc_store_rows(typename IO::T* dst, long long stride, const float (&out)[HS / 8][4], int row0,
                              int T, float mul_lo, float mul_hi) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = row0 + g + 8 * half;
        if (row >= T) continue;
        float mul = half ? mul_hi : mul_lo;
        typename IO::T* d = dst + (long long)row * stride;
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            IO::store2(d + n * 8 + 2 * t, out[n][2 * half] * mul, out[n][2 * half + 1] * mul);
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
template <int HS, class IO>
__device__ void tc_finish_forward(typename IO::T* y, int C, float* lse_bh, const float (&o)[HS / 8][4],
                                  const float (&m)[2], float (&l)[2], int w0, int T) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 1);
        l[r] += __shfl_xor_sync(TC_FULL, l[r], 2);
    }
    tc_store_rows<HS, IO>(y, C, o, w0, T, 1.0f / l[0], 1.0f / l[1]);
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

// ---- the kernels, for either precision P -------------------------------------------------------

template <class P, int HS, class E = typename P::Io::T>
__device__ void tc_forward(E* y, float* lse, const E* qkv, int T, int NH, float scale) {
    __shared__ typename P::template Tile<true, false> ks;  // keys: scores
    __shared__ typename P::template Tile<false, true> vs;  // values: P.V
    TcHead<E> a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;  // longest rows first
    int w0 = i0 + a.warp * 16;                        // this warp's first query
    typename P::Frag qa;
    P::load_rows(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[HS / 8][4];
    tc_zero(o);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        __syncthreads();  // the previous tile is consumed
        P::load(ks, a.qkv + a.C, a.C3, j0, T);
        P::load(vs, a.qkv + 2 * a.C, a.C3, j0, T);
        __syncthreads();
        if (j0 > w0 + 15) continue;  // warp-uniform: every key of the tile is in this warp's future
        float s[TC_TILE / 8][4];
        P::template scores<TC_TILE / 8>(s, qa, ks, 0);
        tc_online_softmax<HS>(s, m, l, o, j0, w0);
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += P::GROUP) P::accumulate(o, &s[n], vs, n * 8);
    }
    tc_finish_forward<HS, typename P::Io>(y + a.y_off, a.C, lse + (long long)blockIdx.y * T, o, m, l, w0, T);
}

// dq_i = scale * sum_j p_ij (dy_i . v_j - delta_i) k_j over keys j <= i.
template <class P, int HS, class E = typename P::Io::T>
__device__ void tc_backward_dq(E* dqkv, const E* qkv, const E* dy, const float* lse,
                               const float* delta, int T, int NH, float scale) {
    __shared__ typename P::template Tile<true, true> ks;   // keys: scores and dS.K
    __shared__ typename P::template Tile<true, false> vs;  // values: dp = dy . v
    TcHead<E> a = tc_head<HS>(qkv, T, NH);
    int i0 = (gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    int w0 = i0 + a.warp * 16;
    typename P::Frag qa, da;
    P::load_rows(qa, a.qkv, a.C3, w0, T, scale * TC_LOG2E);
    P::load_rows(da, dy + a.y_off, a.C, w0, T, 1.0f);
    float lse2[2], dl[2];
    tc_row_stats(lse2, dl, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, w0, T);
    float dq[HS / 8][4];
    tc_zero(dq);
    int last = min(i0 + TC_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += TC_TILE) {
        __syncthreads();
        P::load(ks, a.qkv + a.C, a.C3, j0, T);
        P::load(vs, a.qkv + 2 * a.C, a.C3, j0, T);
        __syncthreads();
        if (j0 > w0 + 15) continue;
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += P::GROUP) {  // the keys of one A fragment of dS
            float s[P::GROUP][4], dp[P::GROUP][4];
            P::template scores<P::GROUP>(s, qa, ks, n);
            P::template scores<P::GROUP>(dp, da, vs, n);
#pragma unroll
            for (int u = 0; u < P::GROUP; u++) tc_dq_ds(s[u], dp[u], j0 + (n + u) * 8, w0, lse2, dl);
            P::accumulate(dq, s, ks, n * 8);
        }
    }
    tc_store_rows<HS, typename P::Io>(dqkv + (a.qkv - qkv), a.C3, dq, w0, T, scale, scale);
}

// dv_j = sum_i p_ij dy_i,  dk_j = scale * sum_i p_ij (dy_i . v_j - delta_i) q_i over queries i >= j.
template <class P, int HS, class E = typename P::Io::T>
__device__ void tc_backward_dkv(E* dqkv, const E* qkv, const E* dy, const float* lse,
                                const float* delta, int T, int NH, float scale) {
    __shared__ typename P::template Tile<true, true> qs;   // queries: scores^T and dS^T.Q
    __shared__ typename P::template Tile<true, true> dys;  // dy: dp^T and P^T.dY
    __shared__ float lse2s[TC_TILE], dls[TC_TILE];
    TcHead<E> a = tc_head<HS>(qkv, T, NH);
    int j0 = blockIdx.x * TC_ROWS;  // the first blocks see the most queries
    int w0 = j0 + a.warp * 16;      // this warp's first key
    typename P::Frag ka, va;
    P::load_rows(ka, a.qkv + a.C, a.C3, w0, T, scale * TC_LOG2E);
    P::load_rows(va, a.qkv + 2 * a.C, a.C3, w0, T, 1.0f);
    float dk[HS / 8][4], dv[HS / 8][4];
    tc_zero(dk);
    tc_zero(dv);
    for (int it = j0; it < T; it += TC_TILE) {
        __syncthreads();
        P::load(qs, a.qkv, a.C3, it, T);
        P::load(dys, dy + a.y_off, a.C, it, T);
        tc_load_query_stats(lse2s, dls, lse + (long long)blockIdx.y * T, delta + (long long)blockIdx.y * T, it, T);
        __syncthreads();
        if (it + TC_TILE - 1 < w0) continue;  // warp-uniform: every query is before this warp's keys
#pragma unroll
        for (int n = 0; n < TC_TILE / 8; n += P::GROUP) {  // the queries of one A fragment of P^T, dS^T
            float s[P::GROUP][4], dp[P::GROUP][4], ds[P::GROUP][4];
            P::template scores<P::GROUP>(s, ka, qs, n);  // s^T: rows keys, columns queries
            P::template scores<P::GROUP>(dp, va, dys, n);
#pragma unroll
            for (int u = 0; u < P::GROUP; u++) tc_dkv_p_ds(s[u], dp[u], ds[u], (n + u) * 8, it, w0, lse2s, dls);
            P::accumulate(dv, s, dys, n * 8);
            P::accumulate(dk, ds, qs, n * 8);
        }
    }
    E* out = dqkv + (a.qkv - qkv);
    tc_store_rows<HS, typename P::Io>(out + a.C, a.C3, dk, w0, T, scale, scale);
    tc_store_rows<HS, typename P::Io>(out + 2 * a.C, a.C3, dv, w0, T, 1.0f, 1.0f);
}

// One set of entry points per precision, storage E and supported head size (the fragments live
// in registers, so HS is a compile-time constant); llmpi/gpu/attention.py falls back to
// attention.cu for other sizes.
#define TC_ENTRY_POINTS(PRECISION, NAME, HS, E)                                                         \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_forward_##NAME##HS(E* y, float* lse, const E* qkv, int T, int NH, float scale) {         \
        tc_forward<PRECISION<HS>, HS>(y, lse, qkv, T, NH, scale);                                      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dq_##NAME##HS(E* dqkv, const E* qkv, const E* dy, const float* lse,             \
                                     const float* delta, int T, int NH, float scale) {                 \
        tc_backward_dq<PRECISION<HS>, HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                    \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * 32)                                        \
    attention_backward_dkv_##NAME##HS(E* dqkv, const E* qkv, const E* dy, const float* lse,            \
                                      const float* delta, int T, int NH, float scale) {                \
        tc_backward_dkv<PRECISION<HS>, HS>(dqkv, qkv, dy, lse, delta, T, NH, scale);                   \
    }

TC_ENTRY_POINTS(Tf32, tc, 16, float)
TC_ENTRY_POINTS(Tf32, tc, 32, float)
TC_ENTRY_POINTS(Tf32, tc, 64, float)
TC_ENTRY_POINTS(Bf16, bf16_, 16, float)
TC_ENTRY_POINTS(Bf16, bf16_, 32, float)
TC_ENTRY_POINTS(Bf16, bf16_, 64, float)
TC_ENTRY_POINTS(Bf16Io, bf16io_, 16, bf16_t)
TC_ENTRY_POINTS(Bf16Io, bf16io_, 32, bf16_t)
TC_ENTRY_POINTS(Bf16Io, bf16io_, 64, bf16_t)
