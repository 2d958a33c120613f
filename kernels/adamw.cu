// Fused AdamW over the flat parameter buffer (decoupled weight decay, bias correction).
// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t; grad_scale folds gradient clipping into the update
// without another pass over g.
// write_delta == 0: out = new parameters (out may alias p);
// write_delta != 0: out = new - old, p untouched (the async mode pushes this delta).

__device__ __forceinline__ void adamw_element(int i, float* out, const float* p, const float* g, float* m,
                                              float* v, const float* decay_mask, float lr, float beta1,
                                              float beta2, float eps, float weight_decay, float bc1, float bc2,
                                              float grad_scale, int write_delta) {
    float grad = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * grad;
    float vi = beta2 * v[i] + (1.0f - beta2) * grad * grad;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i];
    float upd = -lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * decay_mask[i] * pi);
    out[i] = write_delta ? upd : pi + upd;
}

// The step's scalars as kernel arguments, computed on the host once per step.
extern "C" __global__ void adamw_update(float* out, const float* p, const float* g, float* m,
                                        float* v, const float* decay_mask, int n, float lr,
                                        float beta1, float beta2, float eps, float weight_decay,
                                        float bc1, float bc2, float grad_scale, int write_delta) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        adamw_element(i, out, p, g, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale,
                      write_delta);
}

// The same with the step's scalars read from device memory, hyper = (lr, bc1, bc2, grad_scale):
// a CUDA graph captures kernel arguments by value, so a captured step reads the scalars that
// change every step (the schedule's lr, t, the clip factor written by clip_factor) from memory.
extern "C" __global__ void adamw_update_from(float* out, const float* p, const float* g, float* m,
                                             float* v, const float* decay_mask, int n, const float* hyper,
                                             float beta1, float beta2, float eps, float weight_decay,
                                             int write_delta) {
    float lr = hyper[0], bc1 = hyper[1], bc2 = hyper[2], grad_scale = hyper[3];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        adamw_element(i, out, p, g, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale,
                      write_delta);
}
