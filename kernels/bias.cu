// The bias of a linear layer on bf16 activations (model.dtype = "bf16"), where the GEMM writes
// bf16 and so cannot take the bias itself: the add after the GEMM, and the bias gradient, the
// column sums of dout, in two deterministic passes (no atomics: the same bits on every run).
// float32 activations need neither: their bias is added by the float32 ops (llmpi.model.layers.linear).
#include "bf16.cuh"

// out (N, OC) bf16 += bias (OC) float32, n = N * OC.
// Eight at a time (16-byte loads) when both pointers are aligned and OC % 8 == 0.
extern "C" __global__ void bias_add_bf16(bf16_t* out, const float* bias, long long n, int OC) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long start = 0;
    if (OC % 8 == 0 && bf16_aligned8(out, bias, bias)) {
        long long n8 = n / 8;
        int oc8 = OC / 8;
        for (long long i = tid; i < n8; i += stride) {
            bf16x8 h = load8(out + 8 * i);
            const float* bv = bias + 8 * (i % oc8);
#pragma unroll
            for (int k = 0; k < 8; k++) h.v[k] += bv[k];
            store8(out + 8 * i, h);
        }
        start = 8 * n8;
    }
    for (long long i = start + tid; i < n; i += stride) st(out, i, ld(out, i) + bias[i % OC]);
}

// Pass 1: partial[p, c] = sum of dout[r, c] over rows r in [p * rows, (p + 1) * rows), in order;
// grid (ceil(OC / blockDim.x), P), a thread per column, so a warp reads 32 adjacent columns.
extern "C" __global__ void bias_grad_partial_bf16(float* partial, const bf16_t* dout, int N, int OC, int rows) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int p = blockIdx.y;
    if (c >= OC) return;
    int hi = min(N, (p + 1) * rows);
    float acc = 0.0f;
    for (int r = p * rows; r < hi; r++) acc += ld(dout, (long long)r * OC + c);
    partial[(long long)p * OC + c] = acc;
}

// Pass 2: db[c] += sum over p of partial[p, c], in p order.
extern "C" __global__ void bias_grad_finish(float* db, const float* partial, int P, int OC) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    float acc = 0.0f;
    for (int p = 0; p < P; p++) acc += partial[(long long)p * OC + c];
    db[c] += acc;
}
