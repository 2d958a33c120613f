// Residual add: out = a + b (out may alias a or b: every element is read before it is written,
// by the same thread). float4 when all three pointers are 16-byte aligned; scalar otherwise.
// residual_forward_bf16: the same on bf16 arrays, the sum rounded once.
#include "bf16.cuh"
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    unsigned long long al = reinterpret_cast<unsigned long long>(out) |
                            reinterpret_cast<unsigned long long>(a) |
                            reinterpret_cast<unsigned long long>(b);
    int start = 0;
    if ((al & 15ull) == 0) {
        int n4 = n / 4;
        float4* o4 = reinterpret_cast<float4*>(out);
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        for (int i = tid; i < n4; i += stride) {
            float4 u = a4[i], v = b4[i];
            u.x += v.x;
            u.y += v.y;
            u.z += v.z;
            u.w += v.w;
            o4[i] = u;
        }
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) out[i] = a[i] + b[i];
}

extern "C" __global__ void residual_forward_bf16(bf16_t* out, const bf16_t* a, const bf16_t* b, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (bf16_aligned8(out, a, b)) {
        int n8 = n / 8;
        for (int i = tid; i < n8; i += stride) {
            bf16x8 u = load8(a + 8 * i), v = load8(b + 8 * i);
#pragma unroll
            for (int k = 0; k < 8; k++) u.v[k] += v.v[k];
            store8(out + 8 * i, u);
        }
        start = 8 * n8;
    }
    for (int i = start + tid; i < n; i += stride) st(out, i, ld(a, i) + ld(b, i));
}
