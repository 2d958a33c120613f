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

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_forward(float* y, float* lse, const float* qkv, int T, int NH, int HS, float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAX_HS + 1];  // +1: lane-strided rows hit distinct banks
    __shared__ float vs[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float qs[ATT_WARPS][ATT_MAX_HS];
    int C = NH * HS;
    long long C3 = 3LL * C;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int i0 = blockIdx.x * ATT_WARPS;
    int i = i0 + warp;
    const float* base = qkv + (long long)b * T * C3 + h * HS;
    if (i < T)
        for (int d = lane; d < HS; d += 32) qs[warp][d] = base[i * C3 + d] * scale;
    float m = ATT_NEG_INF, l = 0.0f;
    float acc[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) acc[r] = 0.0f;
    int last = min(i0 + ATT_WARPS, T) - 1;  // the block's last query sees keys up to itself
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();  // qs written / previous tile consumed
        att_load_tiles(ks, vs, base + C, C3, base + 2 * C, C3, j0, T, HS);
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
            for (int jj = 0; jj < jn; jj++) {
                float pj = __shfl_sync(ATT_FULL, p, jj);
#pragma unroll
                for (int r = 0; r < ATT_DPL; r++) {
                    int d = lane + 32 * r;
                    if (d < HS) acc[r] += pj * vs[jj][d];
                }
            }
            m = mnew;
        }
    }
    if (i < T) {
        float inv = 1.0f / l;
        float* yr = y + ((long long)b * T + i) * C + h * HS;
#pragma unroll
        for (int r = 0; r < ATT_DPL; r++) {
            int d = lane + 32 * r;
            if (d < HS) yr[d] = acc[r] * inv;
        }
        if (lane == 0) lse[(long long)blockIdx.y * T + i] = m + logf(l);
    }
}

// delta (B,NH,T) = rowsum(dy * y) per head; one warp per (b, t, h). Launch 1-D, 256 threads.
extern "C" __global__ void attention_backward_delta(float* delta, const float* dy, const float* y,
                                                    int B, int T, int NH, int HS) {
    int lane = threadIdx.x % 32;
    long long w = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (w >= (long long)B * T * NH) return;
    int h = (int)(w % NH);
    long long bt = w / NH;
    long long off = bt * NH * HS + (long long)h * HS;
    float s = 0.0f;
    for (int d = lane; d < HS; d += 32) s += dy[off + d] * y[off + d];
    s = att_warp_sum(s);
    int b = (int)(bt / T), t = (int)(bt % T);
    if (lane == 0) delta[((long long)b * NH + h) * T + t] = s;
}

// dq_i = scale * sum_j p_ij (dy_i . v_j - delta_i) k_j  -> dqkv[:, :, h*HS : (h+1)*HS]
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_backward_dq(float* dqkv, const float* qkv, const float* dy, const float* lse,
                      const float* delta, int T, int NH, int HS, float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float vs[ATT_TILE][ATT_MAX_HS + 1];
    __shared__ float qs[ATT_WARPS][ATT_MAX_HS];
    __shared__ float dys[ATT_WARPS][ATT_MAX_HS];
    int C = NH * HS;
    long long C3 = 3LL * C;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int i0 = blockIdx.x * ATT_WARPS;
    int i = i0 + warp;
    const float* base = qkv + (long long)b * T * C3 + h * HS;
    float lse_i = 0.0f, delta_i = 0.0f;
    if (i < T) {
        const float* dyr = dy + ((long long)b * T + i) * C + h * HS;
        for (int d = lane; d < HS; d += 32) {
            qs[warp][d] = base[i * C3 + d] * scale;
            dys[warp][d] = dyr[d];
        }
        lse_i = lse[(long long)blockIdx.y * T + i];
        delta_i = delta[(long long)blockIdx.y * T + i];
    }
    float acc[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) acc[r] = 0.0f;
    int last = min(i0 + ATT_WARPS, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        att_load_tiles(ks, vs, base + C, C3, base + 2 * C, C3, j0, T, HS);
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
            for (int jj = 0; jj < jn; jj++) {
                float dsj = __shfl_sync(ATT_FULL, ds, jj);
#pragma unroll
                for (int r = 0; r < ATT_DPL; r++) {
                    int d = lane + 32 * r;
                    if (d < HS) acc[r] += dsj * ks[jj][d];
                }
            }
        }
    }
    if (i < T) {
        float* out = dqkv + ((long long)b * T + i) * C3 + h * HS;
#pragma unroll
        for (int r = 0; r < ATT_DPL; r++) {
            int d = lane + 32 * r;
            if (d < HS) out[d] = acc[r] * scale;
        }
    }
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
    int C = NH * HS;
    long long C3 = 3LL * C;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int j0 = blockIdx.x * ATT_WARPS;
    int j = j0 + warp;
    const float* base = qkv + (long long)b * T * C3 + h * HS;
    const float* dybase = dy + (long long)b * T * C + h * HS;
    const float* lse_bh = lse + (long long)blockIdx.y * T;
    const float* delta_bh = delta + (long long)blockIdx.y * T;
    if (j < T)
        for (int d = lane; d < HS; d += 32) {
            kw[warp][d] = base[j * C3 + C + d];
            vw[warp][d] = base[j * C3 + 2 * C + d];
        }
    float dk[ATT_DPL], dv[ATT_DPL];
#pragma unroll
    for (int r = 0; r < ATT_DPL; r++) dk[r] = dv[r] = 0.0f;
    for (int it = (j0 / ATT_TILE) * ATT_TILE; it < T; it += ATT_TILE) {
        __syncthreads();
        att_load_tiles(qt, dyt, base, C3, dybase, C, it, T, HS);
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
                float pi = __shfl_sync(ATT_FULL, p, ii);
                float dsi = __shfl_sync(ATT_FULL, ds, ii);
#pragma unroll
                for (int r = 0; r < ATT_DPL; r++) {
                    int d = lane + 32 * r;
                    if (d < HS) {
                        dv[r] += pi * dyt[ii][d];
                        dk[r] += dsi * qt[ii][d];
                    }
                }
            }
        }
    }
    if (j < T) {
        float* out = dqkv + ((long long)b * T + j) * C3 + h * HS;
#pragma unroll
        for (int r = 0; r < ATT_DPL; r++) {
            int d = lane + 32 * r;
            if (d < HS) {
                out[C + d] = dk[r] * scale;
                out[2 * C + d] = dv[r];
            }
        }
    }
}
