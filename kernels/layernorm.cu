// LayerNorm over the last axis: x (N,C) -> out (N,C), saving mean and rstd (N,) for backward.
// One warp per row (llm.c's layout); blockDim must be a multiple of 32.

__device__ float ln_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* x,
                                             const float* w, const float* b, int N, int C,
                                             float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // whole warp leaves together, so later shuffles stay full-warp
    const float* xr = x + (long long)row * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    float m = ln_warp_sum(s) / C;
    // second pass over x (cached) for the variance: more accurate than E[x^2] - m^2
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = xr[c] - m;
        v += d * d;
    }
    float r = 1.0f / sqrtf(ln_warp_sum(v) / C + eps);
    float* o = out + (long long)row * C;
    for (int c = lane; c < C; c += 32) o[c] = (xr[c] - m) * r * w[c] + b[c];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
// accumulate != 0 adds into dx (residual stream) instead of overwriting it.
extern "C" __global__ void layernorm_backward_dx(float* dx, const float* dout, const float* x,
                                                 const float* w, const float* mean,
                                                 const float* rstd, int N, int C, int accumulate) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    long long off = (long long)row * C;
    float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dn = dout[off + c] * w[c];
        s1 += dn;
        s2 += dn * (x[off + c] - m) * r;
    }
    float mean1 = ln_warp_sum(s1) / C;
    float mean2 = ln_warp_sum(s2) / C;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[off + c] - m) * r;
        float g = r * (dout[off + c] * w[c] - mean1 - norm * mean2);
        dx[off + c] = accumulate ? dx[off + c] + g : g;
    }
}

// Deterministic dw/db, pass 1: thread (c, chunk) sums rows [chunk*rows, (chunk+1)*rows) in
// order; partial is (2, P, C) with P = gridDim.y: dw partials then db partials.
extern "C" __global__ void layernorm_backward_params_partial(float* partial, const float* dout,
                                                             const float* x, const float* mean,
                                                             const float* rstd, int N, int C,
                                                             int rows) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int p = blockIdx.y;
    if (c >= C) return;
    int lo = p * rows;
    int hi = min(N, lo + rows);
    float dw = 0.0f, db = 0.0f;
    for (int r = lo; r < hi; r++) {
        long long i = (long long)r * C + c;
        dw += dout[i] * (x[i] - mean[r]) * rstd[r];
        db += dout[i];
    }
    long long P = gridDim.y;
    partial[(long long)p * C + c] = dw;
    partial[(P + p) * C + c] = db;
}

// Pass 2: dw[c] += sum_p partial[0,p,c]; db[c] += sum_p partial[1,p,c], in chunk order.
extern "C" __global__ void layernorm_backward_params_finish(float* dw, float* db,
                                                            const float* partial, int P, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sw = 0.0f, sb = 0.0f;
    for (int p = 0; p < P; p++) {
        sw += partial[(long long)p * C + c];
        sb += partial[(long long)(P + p) * C + c];
    }
    dw[c] += sw;
    db[c] += sb;
}
