// Token + position embedding (GPT-2 wte/wpe) and its deterministic backward.
// Shapes: idx (B,T) int32, wte (V,C), wpe (maxT,C), out/dout (B,T,C); BT = B*T.
// The weights are float32; out and dout are float32, or bf16 in the *_bf16 entry points.
#include "bf16.cuh"

template <typename S>
__device__ void embedding_forward_rows(S* out, const int* idx, const float* wte, const float* wpe, int BT,
                                       int T, int C) {
    long long n = (long long)BT * C;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        int bt = (int)(i / C);
        int c = (int)(i % C);
        st(out, i, wte[(long long)idx[bt] * C + c] + wpe[(long long)(bt % T) * C + c]);
    }
}

// out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]; one thread per output element.
extern "C" __global__ void embedding_forward(float* out, const int* idx, const float* wte,
                                             const float* wpe, int BT, int T, int C) {
    if (C % 4 == 0 && ((reinterpret_cast<unsigned long long>(out) |
                        reinterpret_cast<unsigned long long>(wte) |
                        reinterpret_cast<unsigned long long>(wpe)) & 15ull) == 0) {
        // float4 path: rows of wte, wpe and out are 16-byte aligned since C % 4 == 0
        int C4 = C / 4;
        long long n4 = (long long)BT * C4;
        long long stride4 = (long long)gridDim.x * blockDim.x;
        float4* o4 = reinterpret_cast<float4*>(out);
        const float4* e4 = reinterpret_cast<const float4*>(wte);
        const float4* p4 = reinterpret_cast<const float4*>(wpe);
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride4) {
            int bt = (int)(i / C4);
            int c = (int)(i - (long long)bt * C4);
            float4 u = e4[(long long)idx[bt] * C4 + c];
            float4 v = p4[(long long)(bt % T) * C4 + c];
            u.x += v.x;
            u.y += v.y;
            u.z += v.z;
            u.w += v.w;
            o4[i] = u;
        }
        return;
    }
    embedding_forward_rows(out, idx, wte, wpe, BT, T, C);
}

extern "C" __global__ void embedding_forward_bf16(bf16_t* out, const int* idx, const float* wte,
                                                  const float* wpe, int BT, int T, int C) {
    embedding_forward_rows(out, idx, wte, wpe, BT, T, C);
}

// dwte[v,:] += sum of dout rows whose token is v, without float atomics.
// keys (BT,) int64 are sorted values token*BT + position (unique, so every correct sort
// gives the same order). One block per sorted entry; only the first entry of each
// token's run does work: it sums its run in sorted order, so results are bit-reproducible.
template <typename S>
__device__ void embedding_backward_wte_rows(float* dwte, const S* dout, const long long* keys, int BT, int C) {
    int i = blockIdx.x;
    long long token = keys[i] / BT;
    if (i > 0 && keys[i - 1] / BT == token) return;
    int end = i + 1;
    while (end < BT && keys[end] / BT == token) end++;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = i; j < end; j++) acc += ld(dout, (keys[j] % BT) * C + c);
        dwte[token * C + c] += acc;
    }
}

extern "C" __global__ void embedding_backward_wte(float* dwte, const float* dout,
                                                  const long long* keys, int BT, int C) {
    embedding_backward_wte_rows(dwte, dout, keys, BT, C);
}

extern "C" __global__ void embedding_backward_wte_bf16(float* dwte, const bf16_t* dout,
                                                       const long long* keys, int BT, int C) {
    embedding_backward_wte_rows(dwte, dout, keys, BT, C);
}

// dwpe[t,:] += sum over b of dout[b,t,:]; one thread per (t, c), batch summed in order.
template <typename S>
__device__ void embedding_backward_wpe_rows(float* dwpe, const S* dout, int B, int T, int C) {
    int n = T * C;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int b = 0; b < B; b++) acc += ld(dout, (long long)b * n + i);
        dwpe[i] += acc;
    }
}

extern "C" __global__ void embedding_backward_wpe(float* dwpe, const float* dout, int B, int T, int C) {
    embedding_backward_wpe_rows(dwpe, dout, B, T, C);
}

extern "C" __global__ void embedding_backward_wpe_bf16(float* dwpe, const bf16_t* dout, int B, int T, int C) {
    embedding_backward_wpe_rows(dwpe, dout, B, T, C);
}
