// GELU, tanh approximation (GPT-2): gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),
// k = sqrt(2/pi). Forward optionally fused with the preceding bias add of c_fc.
// Every kernel takes float4 steps when its pointers are 16-byte aligned (a scalar tail for
// n % 4) and scalar steps otherwise. The *_bf16 entry points read and write bf16 activations
// (the bias float32), computing in float32.
#include "bf16.cuh"

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f

__device__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
}

__device__ float gelu_grad(float v) {
    float t = tanhf(GELU_K * (v + GELU_A * v * v * v));
    float dt = GELU_K * (1.0f + 3.0f * GELU_A * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * dt;
}

// F on each component; a template argument, so the call is inlined, not made through a pointer.
template <float (*F)(float)>
__device__ float4 gelu_map4(float4 v) {
    return make_float4(F(v.x), F(v.y), F(v.z), F(v.w));
}

__device__ bool gelu_aligned(const void* a, const void* b, const void* c) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b) |
             reinterpret_cast<unsigned long long>(c)) & 15ull) == 0;
}

extern "C" __global__ void gelu_forward(float* out, const float* x, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (gelu_aligned(out, x, x)) {
        int n4 = n / 4;
        float4* o4 = reinterpret_cast<float4*>(out);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int i = tid; i < n4; i += stride) o4[i] = gelu_map4<gelu_f>(x4[i]);
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) out[i] = gelu_f(x[i]);
}

// pre (N,OC) += bias (OC) in place (backward needs the pre-activation), out = gelu(pre).
// Saves one full read+write of pre compared with a separate bias kernel.
// The float4 path also needs OC % 4 == 0, so that a float4 of pre meets one float4 of bias.
extern "C" __global__ void bias_gelu_forward(float* out, float* pre, const float* bias, int n,
                                             int OC) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (OC % 4 == 0 && gelu_aligned(out, pre, bias)) {
        int n4 = n / 4, oc4 = OC / 4;
        float4* o4 = reinterpret_cast<float4*>(out);
        float4* p4 = reinterpret_cast<float4*>(pre);
        const float4* b4 = reinterpret_cast<const float4*>(bias);
        for (int i = tid; i < n4; i += stride) {
            float4 h = p4[i], bv = b4[i % oc4];
            h = make_float4(h.x + bv.x, h.y + bv.y, h.z + bv.z, h.w + bv.w);
            p4[i] = h;
            o4[i] = gelu_map4<gelu_f>(h);
        }
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) {
        float h = pre[i] + bias[i % OC];
        pre[i] = h;
        out[i] = gelu_f(h);
    }
}

// dx = dout * gelu'(x); dx may alias dout.
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dout, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (gelu_aligned(dx, x, dout)) {
        int n4 = n / 4;
        float4* g4 = reinterpret_cast<float4*>(dx);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* d4 = reinterpret_cast<const float4*>(dout);
        for (int i = tid; i < n4; i += stride) {
            float4 g = gelu_map4<gelu_grad>(x4[i]), d = d4[i];
            g4[i] = make_float4(d.x * g.x, d.y * g.y, d.z * g.z, d.w * g.w);
        }
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) dx[i] = dout[i] * gelu_grad(x[i]);
}

// pre (N,OC) bf16 += bias, rounded to bf16 and kept (backward's input), out = gelu(that value).
// Eight at a time (16-byte loads) when the pointers are aligned and OC % 8 == 0.
extern "C" __global__ void bias_gelu_forward_bf16(bf16_t* out, bf16_t* pre, const float* bias, int n, int OC) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (OC % 8 == 0 && bf16_aligned8(out, pre, bias)) {
        int n8 = n / 8, oc8 = OC / 8;
        for (int i = tid; i < n8; i += stride) {
            bf16x8 h = load8(pre + 8 * i), g;
            const float* bv = bias + 8 * (i % oc8);
#pragma unroll
            for (int k = 0; k < 8; k++) h.v[k] = bf16_to_f32(f32_to_bf16(h.v[k] + bv[k]));
            store8(pre + 8 * i, h);  // exact: the values are bf16 already
#pragma unroll
            for (int k = 0; k < 8; k++) g.v[k] = gelu_f(h.v[k]);
            store8(out + 8 * i, g);
        }
        start = 8 * n8;
    }
    for (int i = start + tid; i < n; i += stride) {
        bf16_t h = f32_to_bf16(ld(pre, i) + bias[i % OC]);
        pre[i] = h;
        st(out, i, gelu_f(bf16_to_f32(h)));
    }
}

// out = gelu(x) on bf16 arrays: the activation again from bias_gelu_forward_bf16's kept input
// (model.recompute = "gelu"), the same bits as that kernel wrote.
extern "C" __global__ void gelu_forward_bf16(bf16_t* out, const bf16_t* x, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (bf16_aligned8(out, x, x)) {
        int n8 = n / 8;
        for (int i = tid; i < n8; i += stride) {
            bf16x8 v = load8(x + 8 * i);
#pragma unroll
            for (int k = 0; k < 8; k++) v.v[k] = gelu_f(v.v[k]);
            store8(out + 8 * i, v);
        }
        start = 8 * n8;
    }
    for (int i = start + tid; i < n; i += stride) st(out, i, gelu_f(ld(x, i)));
}

// dx = dout * gelu'(x) on bf16 arrays; dx may alias dout.
extern "C" __global__ void gelu_backward_bf16(bf16_t* dx, const bf16_t* x, const bf16_t* dout, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (bf16_aligned8(dx, x, dout)) {
        int n8 = n / 8;
        for (int i = tid; i < n8; i += stride) {
            bf16x8 v = load8(x + 8 * i), d = load8(dout + 8 * i);
#pragma unroll
            for (int k = 0; k < 8; k++) d.v[k] *= gelu_grad(v.v[k]);
            store8(dx + 8 * i, d);
        }
        start = 8 * n8;
    }
    for (int i = start + tid; i < n; i += stride) st(dx, i, ld(dout, i) * gelu_grad(ld(x, i)));
}
