// Fused classifier: softmax + cross-entropy + dlogits in one kernel, one block per row.
// logits (N,V), row r at logits + r * row_stride (row_stride >= V: the model pads the rows so
// that its LM-head GEMMs see aligned rows), are overwritten in place by
// dlogits = (softmax - onehot(target)) * dloss, so the probabilities are never stored; the
// padding columns are neither read nor written. Pass 1 keeps an online (max, sum of exp) per thread;
// pass 2 writes the gradient.
// blockDim must be a multiple of 32 and at most 1024.
// crossentropy_fused_bf16: the same on bf16 logits (model.dtype = "bf16"), float32 arithmetic,
// 16-byte loads of 8 logits where the row starts aligned (a scalar tail of V % 8); scale_rows_bf16
// applies a loss scale to its dlogits afterwards.
#include "bf16.cuh"

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

__device__ void ce_push(MaxSum& acc, float xv) {
    if (xv > acc.m) {
        acc.s = acc.s * expf(acc.m - xv) + 1.0f;
        acc.m = xv;
    } else {
        acc.s += expf(xv - acc.m);
    }
}

__device__ void ce_push4(MaxSum& acc, float4 q) {
    float m = fmaxf(acc.m, fmaxf(fmaxf(q.x, q.y), fmaxf(q.z, q.w)));
    float e = (expf(q.x - m) + expf(q.y - m)) + (expf(q.z - m) + expf(q.w - m));
    acc.s = (acc.m == CE_NEG_INF ? 0.0f : acc.s * expf(acc.m - m)) + e;
    acc.m = m;
}

// The logsumexp of a row from every thread's (max, sum), the same value in all threads.
__device__ float ce_block_lse(MaxSum acc, float* sh_m, float* sh_s) {
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
    return acc.m + logf(acc.s);
}

// (softmax - onehot) * dloss for the four logits q at columns v .. v + 3
__device__ float4 ce_grad4(float4 q, int v, int tgt, float lse, float dloss) {
    q.x = (expf(q.x - lse) - (v == tgt ? 1.0f : 0.0f)) * dloss;
    q.y = (expf(q.y - lse) - (v + 1 == tgt ? 1.0f : 0.0f)) * dloss;
    q.z = (expf(q.z - lse) - (v + 2 == tgt ? 1.0f : 0.0f)) * dloss;
    q.w = (expf(q.w - lse) - (v + 3 == tgt ? 1.0f : 0.0f)) * dloss;
    return q;
}

// losses (N,) = logsumexp(row) - row[target]; write_dlogits == 0 leaves logits untouched.
// A row (any V, any 4-byte-aligned start) is split into a scalar head up to the first 16-byte
// boundary, a float4 body and a scalar tail of at most 3 elements.
extern "C" __global__ void crossentropy_fused(float* logits, float* losses, const int* targets,
                                              int N, int V, long long row_stride, float dloss,
                                              int write_dlogits) {
    __shared__ float sh_m[32];
    __shared__ float sh_s[32];
    int row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + row * row_stride;
    int head = (int)(((16ull - (reinterpret_cast<unsigned long long>(x) & 15ull)) & 15ull) / 4ull);
    if (head > V) head = V;
    int n4 = (V - head) / 4;
    int tail = head + 4 * n4;
    MaxSum acc;
    acc.m = CE_NEG_INF;
    acc.s = 0.0f;
    for (int v = threadIdx.x; v < head; v += blockDim.x) ce_push(acc, x[v]);
    for (int v = tail + (int)threadIdx.x; v < V; v += blockDim.x) ce_push(acc, x[v]);
    const float4* x4 = reinterpret_cast<const float4*>(x + head);
    // four independent float4 loads in flight per thread, then the remainder one at a time
    int bd = blockDim.x;
    int i = threadIdx.x;
    for (; i + 3 * bd < n4; i += 4 * bd) {
        float4 q0 = x4[i], q1 = x4[i + bd], q2 = x4[i + 2 * bd], q3 = x4[i + 3 * bd];
        ce_push4(acc, q0);
        ce_push4(acc, q1);
        ce_push4(acc, q2);
        ce_push4(acc, q3);
    }
    for (; i < n4; i += bd) ce_push4(acc, x4[i]);
    float lse = ce_block_lse(acc, sh_m, sh_s);
    int tgt = targets[row];
    if (threadIdx.x == 0) losses[row] = lse - x[tgt];
    if (!write_dlogits) return;
    __syncthreads();  // x[tgt] is read above before any thread overwrites it below
    for (int v = threadIdx.x; v < head; v += blockDim.x) {
        float p = expf(x[v] - lse);
        x[v] = (p - (v == tgt ? 1.0f : 0.0f)) * dloss;
    }
    for (int v = tail + (int)threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(x[v] - lse);
        x[v] = (p - (v == tgt ? 1.0f : 0.0f)) * dloss;
    }
    float4* y4 = reinterpret_cast<float4*>(x + head);
    i = threadIdx.x;
    for (; i + 3 * bd < n4; i += 4 * bd) {
        float4 q0 = y4[i], q1 = y4[i + bd], q2 = y4[i + 2 * bd], q3 = y4[i + 3 * bd];
        y4[i] = ce_grad4(q0, head + 4 * i, tgt, lse, dloss);
        y4[i + bd] = ce_grad4(q1, head + 4 * (i + bd), tgt, lse, dloss);
        y4[i + 2 * bd] = ce_grad4(q2, head + 4 * (i + 2 * bd), tgt, lse, dloss);
        y4[i + 3 * bd] = ce_grad4(q3, head + 4 * (i + 3 * bd), tgt, lse, dloss);
    }
    for (; i < n4; i += bd) y4[i] = ce_grad4(y4[i], head + 4 * i, tgt, lse, dloss);
}

extern "C" __global__ void crossentropy_fused_bf16(bf16_t* logits, float* losses, const int* targets, int N,
                                                   int V, long long row_stride, float dloss, int write_dlogits) {
    __shared__ float sh_m[32];
    __shared__ float sh_s[32];
    int row = blockIdx.x;
    if (row >= N) return;
    bf16_t* x = logits + row * row_stride;
    int n8 = bf16_aligned8(x, x, x) ? V / 8 : 0;
    MaxSum acc;
    acc.m = CE_NEG_INF;
    acc.s = 0.0f;
    for (int i = threadIdx.x; i < n8; i += blockDim.x) {
        bf16x8 q = load8(x + 8 * i);
        ce_push4(acc, make_float4(q.v[0], q.v[1], q.v[2], q.v[3]));
        ce_push4(acc, make_float4(q.v[4], q.v[5], q.v[6], q.v[7]));
    }
    for (int v = 8 * n8 + (int)threadIdx.x; v < V; v += blockDim.x) ce_push(acc, bf16_to_f32(x[v]));
    float lse = ce_block_lse(acc, sh_m, sh_s);
    int tgt = targets[row];
    if (threadIdx.x == 0) losses[row] = lse - bf16_to_f32(x[tgt]);
    if (!write_dlogits) return;
    __syncthreads();  // x[tgt] is read above before any thread overwrites it below
    for (int i = threadIdx.x; i < n8; i += blockDim.x) {
        bf16x8 q = load8(x + 8 * i);
#pragma unroll
        for (int k = 0; k < 8; k++) q.v[k] = (expf(q.v[k] - lse) - (8 * i + k == tgt ? 1.0f : 0.0f)) * dloss;
        store8(x + 8 * i, q);
    }
    for (int v = 8 * n8 + (int)threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(bf16_to_f32(x[v]) - lse);
        st(x, v, (p - (v == tgt ? 1.0f : 0.0f)) * dloss);
    }
}

// x[r, v] *= factor for the first V columns of N rows row_stride apart (one block per row).
extern "C" __global__ void scale_rows_bf16(bf16_t* x, int N, int V, long long row_stride, float factor) {
    if ((int)blockIdx.x >= N) return;
    bf16_t* r = x + blockIdx.x * row_stride;
    for (int v = threadIdx.x; v < V; v += blockDim.x) st(r, v, bf16_to_f32(r[v]) * factor);
}
