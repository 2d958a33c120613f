// GELU, tanh approximation (GPT-2): gelu(x) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),
// k = sqrt(2/pi). Forward optionally fused with the preceding bias add of c_fc.

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f

__device__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
}

extern "C" __global__ void gelu_forward(float* out, const float* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = gelu_f(x[i]);
}

// pre (N,OC) += bias (OC) in place (backward needs the pre-activation), out = gelu(pre).
// Saves one full read+write of pre compared with a separate bias kernel.
extern "C" __global__ void bias_gelu_forward(float* out, float* pre, const float* bias, int n,
                                             int OC) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float h = pre[i] + bias[i % OC];
        pre[i] = h;
        out[i] = gelu_f(h);
    }
}

// dx = dout * gelu'(x); dx may alias dout.
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dout, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(GELU_K * (v + GELU_A * v * v * v));
        float dt = GELU_K * (1.0f + 3.0f * GELU_A * v * v);
        dx[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * dt);
    }
}
