// Fused classifier: softmax + cross-entropy + dlogits in one kernel, one block per row.
// logits (N,V) are overwritten in place by dlogits = (softmax - onehot(target)) * dloss, so
// the probabilities are never stored. Pass 1 keeps an online (max, sum of exp) per thread;
// pass 2 writes the gradient.
// blockDim must be a multiple of 32 and at most 1024.

#define CE_NEG_INF __int_as_float(0xff800000)

struct MaxSum {
    float m;  // running max
    float s;  // sum of exp(x - m)
};

__device__ MaxSum ce_combine(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == CE_NEG_INF) return a;  // both empty: avoid exp(-inf - -inf) = NaN
    MaxSum r;
    r.m = m;
    r.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
    return r;
}

__device__ MaxSum ce_warp_combine(MaxSum a) {
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        a = ce_combine(a, b);
    }
    return a;
}

// losses (N,) = logsumexp(row) - row[target]; write_dlogits == 0 leaves logits untouched.
extern "C" __global__ void crossentropy_fused(float* logits, float* losses, const int* targets,
                                              int N, int V, float dloss, int write_dlogits) {
    __shared__ float sh_m[32];
    __shared__ float sh_s[32];
    int row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + (long long)row * V;
    MaxSum acc;
    acc.m = CE_NEG_INF;
    acc.s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float xv = x[v];
        if (xv > acc.m) {
            acc.s = acc.s * expf(acc.m - xv) + 1.0f;
            acc.m = xv;
        } else {
            acc.s += expf(xv - acc.m);
        }
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    acc = ce_warp_combine(acc);
    if (lane == 0) {
        sh_m[warp] = acc.m;
        sh_s[warp] = acc.s;
    }
    __syncthreads();
    // every warp reduces the per-warp results the same way, so all threads agree
    int nw = blockDim.x / 32;
    acc.m = lane < nw ? sh_m[lane] : CE_NEG_INF;
    acc.s = lane < nw ? sh_s[lane] : 0.0f;
    acc = ce_warp_combine(acc);
    float lse = acc.m + logf(acc.s);
    int tgt = targets[row];
    if (threadIdx.x == 0) losses[row] = lse - x[tgt];
    if (!write_dlogits) return;
    __syncthreads();  // x[tgt] is read above before any thread overwrites it below
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(x[v] - lse);
        x[v] = (p - (v == tgt ? 1.0f : 0.0f)) * dloss;
    }
}
