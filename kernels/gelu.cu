// GELU, tanh approximation (GPT-2): gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),
// k = sqrt(2/pi). Forward optionally fused with the preceding bias add of c_fc.

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f

__device__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
}

// float4 when out and x are 16-byte aligned (scalar tail of n % 4), scalar otherwise.
extern "C" __global__ void gelu_forward(float* out, const float* x, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (((reinterpret_cast<unsigned long long>(out) | reinterpret_cast<unsigned long long>(x)) &
         15ull) == 0) {
        int n4 = n / 4;
        float4* o4 = reinterpret_cast<float4*>(out);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int i = tid; i < n4; i += stride) {
            float4 v = x4[i];
            v.x = gelu_f(v.x);
            v.y = gelu_f(v.y);
            v.z = gelu_f(v.z);
            v.w = gelu_f(v.w);
            o4[i] = v;
        }
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) out[i] = gelu_f(x[i]);
}

// pre (N,OC) += bias (OC) in place (backward needs the pre-activation), out = gelu(pre).
// Saves one full read+write of pre compared with a separate bias kernel.
// float4 when OC % 4 == 0 and out, pre, bias are 16-byte aligned, scalar otherwise.
extern "C" __global__ void bias_gelu_forward(float* out, float* pre, const float* bias, int n,
                                             int OC) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (OC % 4 == 0 && ((reinterpret_cast<unsigned long long>(out) |
                         reinterpret_cast<unsigned long long>(pre) |
                         reinterpret_cast<unsigned long long>(bias)) & 15ull) == 0) {
        int n4 = n / 4, oc4 = OC / 4;
        float4* o4 = reinterpret_cast<float4*>(out);
        float4* p4 = reinterpret_cast<float4*>(pre);
        const float4* b4 = reinterpret_cast<const float4*>(bias);
        for (int i = tid; i < n4; i += stride) {
            float4 h = p4[i], bv = b4[i % oc4];
            h.x += bv.x;
            h.y += bv.y;
            h.z += bv.z;
            h.w += bv.w;
            p4[i] = h;
            h.x = gelu_f(h.x);
            h.y = gelu_f(h.y);
            h.z = gelu_f(h.z);
            h.w = gelu_f(h.w);
            o4[i] = h;
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
__device__ float gelu_grad(float v) {
    float t = tanhf(GELU_K * (v + GELU_A * v * v * v));
    float dt = GELU_K * (1.0f + 3.0f * GELU_A * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * dt;
}

// float4 when dx, x, dout are 16-byte aligned (scalar tail of n % 4), scalar otherwise.
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dout, int n) {
    int tid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    int start = 0;
    if (((reinterpret_cast<unsigned long long>(dx) | reinterpret_cast<unsigned long long>(x) |
          reinterpret_cast<unsigned long long>(dout)) & 15ull) == 0) {
        int n4 = n / 4;
        float4* g4 = reinterpret_cast<float4*>(dx);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* d4 = reinterpret_cast<const float4*>(dout);
        for (int i = tid; i < n4; i += stride) {
            float4 v = x4[i], d = d4[i];
            d.x *= gelu_grad(v.x);
            d.y *= gelu_grad(v.y);
            d.z *= gelu_grad(v.z);
            d.w *= gelu_grad(v.w);
            g4[i] = d;
        }
        start = 4 * n4;
    }
    for (int i = start + tid; i < n; i += stride) dx[i] = dout[i] * gelu_grad(x[i]);
}
