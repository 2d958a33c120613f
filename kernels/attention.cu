// Causal self-attention, flash-attention style: the (T,T) score matrix never reaches global
// memory. Works straight on c_attn's output qkv (B,T,3C), C = NH*HS, head h of q/k/v at
// columns h*HS, C + h*HS, 2C + h*HS; writes y (B,T,C) (heads already re-joined) and the
// per-row logsumexp lse (B,NH,T) of the scaled scores for backward.
//
// Layout: one warp per row (query row in forward/dq, key row in dk/dv), ATT_WARPS rows per
// block, a tile of ATT_TILE = 32 keys (or queries) in shared memory, one per lane. A lane
// computes the full dot product for "its" tile row; for the weighted sums over the tile
// each lane owns output dims d = lane + 32*r (r < 4, so HS <= 128) and receives the tile
// row weights by warp shuffle. Backward (FlashAttention-2 math) recomputes p = exp(s - lse)
// and is split into a dq kernel (loop over keys) and a dk/dv kernel (loop over queries), so
// every output element is written by exactly one warp: no atomics, deterministic.
// Launch: block = ATT_WARPS*32 threads, grid = (ceil(T/ATT_WARPS), B*NH).

#define ATT_WARPS 8
#define ATT_TILE 32
#define ATT_MAX_HS 128
#define ATT_DPL (ATT_MAX_HS / 32)  // output dims per lane
#define ATT_FULL 0xffffffffu
#define ATT_NEG_INF __int_as_float(0xff800000)

#include "bf16.cuh"

__device__ float att_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ATT_FULL, v, o);
    return v;
}

__device__ float att_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ATT_FULL, v, o));
    return v;
}

// Loads rows [r0, r0+ATT_TILE) of two (rows, HS) head slices with row strides sa, sb into
// shared tiles; rows past T are zero.
__device__ void att_load_tiles(float (*ta)[ATT_MAX_HS + 1], float (*tb)[ATT_MAX_HS + 1],
                               const float* base_a, long long sa, const float* base_b,
                               long long sb, int r0, int T, int HS) {
    for (int e = threadIdx.x; e < ATT_TILE * HS; e += blockDim.x) {
        int rr = e / HS, d = e % HS;
        int r = r0 + rr;
        float a = 0.0f, b = 0.0f;
        if (r < T) {
            a = base_a[r * sa + d];
            b = base_b[r * sb + d];
        }
        ta[rr][d] = a;
        tb[rr][d] = b;
    }
}

// What every block of the three tile kernels starts from: its (batch, head) and its rows.
struct AttBlock {
    int C;            // NH * HS
    long long C3;     // row stride of qkv
    int warp, lane;
    int row0, row;    // the block's first row and this warp's row (a query, or a key in dkv)
    const float* qkv; // head slice: q at qkv[t*C3 + d], k at + C, v at + 2C
    long long y_off;  // where the head's (T, HS) slice starts in a (B,T,C) array (y, dy)
};

__device__ AttBlock att_block(const float* qkv, int T, int NH, int HS) {
    AttBlock a;
    a.C = NH * HS;
    a.C3 = 3LL * a.C;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    a.warp = threadIdx.x / 32;
    a.lane = threadIdx.x % 32;
    a.row0 = blockIdx.x * ATT_WARPS;
    a.row = a.row0 + a.warp;
    a.qkv = qkv + (long long)b * T * a.C3 + h * HS;
    a.y_off = (long long)b * T * a.C + h * HS;
    return a;
}

// acc[r] += w * src[d] over this lane's output dims d = lane + 32*r.
__device__ void att_axpy(float (&acc)[ATT_DPL], float w, const float* src, int lane, int HS) {
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) {
        int d = lane + 32 * r;
        if (d < HS) acc[r] += w * src[d];
    }
}

// dst[d] = acc[r] * mul over this lane's output dims.
__device__ void att_store(float* dst, const float (&acc)[ATT_DPL], float mul, int lane, int HS) {
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) {
        int d = lane + 32 * r;
        if (d < HS) dst[d] = acc[r] * mul;
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_forward(float* y, float* lse, const float* qkv, int T, int NH, int HS, float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAX_HS + 1];  // +1: lane-strided rows hit distinct banks
    __shared__ float vs[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float qs[ATT_WARPS][ATT_MAX_HS];
    AttBlock a = att_block(qkv, T, NH, HS);
    int warp = a.warp, lane = a.lane, i = a.row;
    if (i < T)
        for (int d = lane; d < HS; d += 32) qs[warp][d] = a.qkv[i * a.C3 + d] * scale;
    float m = ATT_NEG_INF, l = 0.0f;
    float acc[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) acc[r] = 0.0f;
    int last = min(a.row0 + ATT_WARPS, T) - 1;  // the block's last query sees keys up to itself
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();  // qs written / previous tile consumed
        att_load_tiles(ks, vs, a.qkv + a.C, a.C3, a.qkv + 2 * a.C, a.C3, j0, T, HS);
        __syncthreads();
        if (i < T && j0 <= i) {  // warp-uniform; key j0 <= i keeps the running max finite
            int j = j0 + lane;
            float s = 0.0f;
#pragma unroll 8
            for (int d = 0; d < HS; d++) s += qs[warp][d] * ks[lane][d];
            if (j > i) s = ATT_NEG_INF;
            float mnew = fmaxf(m, att_warp_max(s));
            float p = j > i ? 0.0f : expf(s - mnew);
            float corr = expf(m - mnew);  // 0 on the first tile (m = -inf)
            l = l * corr + att_warp_sum(p);
            int jn = min(ATT_TILE, i - j0 + 1);
#pragma unroll
            for (int r = 0; r < ATT_DPL; r++) acc[r] *= corr;
            for (int jj = 0; jj < jn; jj++) att_axpy(acc, __shfl_sync(ATT_FULL, p, jj), vs[jj], lane, HS);
            m = mnew;
        }
    }
    if (i < T) {
        att_store(y + a.y_off + (long long)i * a.C, acc, 1.0f / l, lane, HS);
        if (lane == 0) lse[(long long)blockIdx.y * T + i] = m + logf(l);
    }
}

// delta (B,NH,T) = rowsum(dy * y) per head; one warp per (b, t, h). Launch 1-D, 256 threads.
// dy and y are float32, or bf16 (the bf16 tensor-core kernels of attention_tc.cu on bf16 storage).
template <class E>
__device__ void att_backward_delta(float* delta, const E* dy, const E* y, int B, int T, int NH, int HS) {
    int lane = threadIdx.x % 32;
    long long w = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (w >= (long long)B * T * NH) return;
    int h = (int)(w % NH);
    long long bt = w / NH;
    long long off = bt * NH * HS + (long long)h * HS;
    float s = 0.0f;
    for (int d = lane; d < HS; d += 32) s += ld(dy, off + d) * ld(y, off + d);
    s = att_warp_sum(s);
    int b = (int)(bt / T), t = (int)(bt % T);
    if (lane == 0) delta[((long long)b * NH + h) * T + t] = s;
}

extern "C" __global__ void attention_backward_delta(float* delta, const float* dy, const float* y,
                                                    int B, int T, int NH, int HS) {
    att_backward_delta(delta, dy, y, B, T, NH, HS);
}

extern "C" __global__ void attention_backward_delta_bf16(float* delta, const bf16_t* dy, const bf16_t* y,
                                                         int B, int T, int NH, int HS) {
    att_backward_delta(delta, dy, y, B, T, NH, HS);
}

// dq_i = scale * sum_j p_ij (dy_i . v_j - delta_i) k_j  -> dqkv[:, :, h*HS : (h+1)*HS]
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_backward_dq(float* dqkv, const float* qkv, const float* dy, const float* lse,
                      const float* delta, int T, int NH, int HS, float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float vs[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float qs[ATT_WARPS][ATT_MAX_HS];
    __shared__ float dys[ATT_WARPS][ATT_MAX_HS];
    AttBlock a = att_block(qkv, T, NH, HS);
    int warp = a.warp, lane = a.lane, i = a.row;
    float lse_i = 0.0f, delta_i = 0.0f;
    if (i < T) {
        const float* dyr = dy + a.y_off + (long long)i * a.C;
        for (int d = lane; d < HS; d += 32) {
            qs[warp][d] = a.qkv[i * a.C3 + d] * scale;
            dys[warp][d] = dyr[d];
        }
        lse_i = lse[(long long)blockIdx.y * T + i];
        delta_i = delta[(long long)blockIdx.y * T + i];
    }
    float acc[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) acc[r] = 0.0f;
    int last = min(a.row0 + ATT_WARPS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        att_load_tiles(ks, vs, a.qkv + a.C, a.C3, a.qkv + 2 * a.C, a.C3, j0, T, HS);
        __syncthreads();
        if (i < T && j0 <= i) {
            int j = j0 + lane;
            float s = 0.0f, dp = 0.0f;
#pragma unroll 8
            for (int d = 0; d < HS; d++) {
                s += qs[warp][d] * ks[lane][d];
                dp += dys[warp][d] * vs[lane][d];
            }
            float ds = j > i ? 0.0f : expf(s - lse_i) * (dp - delta_i);
            int jn = min(ATT_TILE, i - j0 + 1);
            for (int jj = 0; jj < jn; jj++) att_axpy(acc, __shfl_sync(ATT_FULL, ds, jj), ks[jj], lane, HS);
        }
    }
    if (i < T) att_store(dqkv + (a.qkv - qkv) + i * a.C3, acc, scale, lane, HS);
}

// dv_j = sum_i p_ij dy_i,  dk_j = scale * sum_i p_ij (dy_i . v_j - delta_i) q_i, over i >= j.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_backward_dkv(float* dqkv, const float* qkv, const float* dy, const float* lse,
                       const float* delta, int T, int NH, int HS, float scale) {
    __shared__ float qt[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float dyt[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float kw[ATT_WARPS][ATT_MAX_HS];
    __shared__ float vw[ATT_WARPS][ATT_MAX_HS];
    __shared__ float lset[ATT_TILE];
    __shared__ float deltat[ATT_TILE];
    AttBlock a = att_block(qkv, T, NH, HS);
    int warp = a.warp, lane = a.lane, j = a.row;  // this warp's row is a key
    const float* lse_bh = lse + (long long)blockIdx.y * T;
    const float* delta_bh = delta + (long long)blockIdx.y * T;
    if (j < T)
        for (int d = lane; d < HS; d += 32) {
            kw[warp][d] = a.qkv[j * a.C3 + a.C + d];
            vw[warp][d] = a.qkv[j * a.C3 + 2 * a.C + d];
        }
    float dk[ATT_DPL], dv[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) dk[r] = dv[r] = 0.0f;
    for (int it = (a.row0 / ATT_TILE) * ATT_TILE; it < T; it += ATT_TILE) {
        __syncthreads();
        att_load_tiles(qt, dyt, a.qkv, a.C3, dy + a.y_off, a.C, it, T, HS);
        if (threadIdx.x < ATT_TILE) {
            int r = it + threadIdx.x;
            lset[threadIdx.x] = r < T ? lse_bh[r] : 0.0f;
            deltat[threadIdx.x] = r < T ? delta_bh[r] : 0.0f;
        }
        __syncthreads();
        if (j < T && it + ATT_TILE - 1 >= j) {  // warp-uniform: tile holds some query i >= j
            int i = it + lane;
            float s = 0.0f, dp = 0.0f;
#pragma unroll 8
            for (int d = 0; d < HS; d++) {
                s += qt[lane][d] * kw[warp][d];
                dp += dyt[lane][d] * vw[warp][d];
            }
            bool valid = i >= j && i < T;
            float p = valid ? expf(s * scale - lset[lane]) : 0.0f;
            float ds = p * (dp - deltat[lane]);
            for (int ii = max(0, j - it); ii < ATT_TILE; ii++) {
                att_axpy(dv, __shfl_sync(ATT_FULL, p, ii), dyt[ii], lane, HS);
                att_axpy(dk, __shfl_sync(ATT_FULL, ds, ii), qt[ii], lane, HS);
            }
        }
    }
    if (j < T) {
        float* out = dqkv + (a.qkv - qkv) + j * a.C3;
        att_store(out + a.C, dk, scale, lane, HS);
        att_store(out + 2 * a.C, dv, 1.0f, lane, HS);
    }
}
