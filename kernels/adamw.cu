// Fused AdamW over the flat parameter buffer (decoupled weight decay, bias correction).
// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t are computed on the host once per step.
// grad_scale folds gradient clipping into the update without another pass over g.
// write_delta == 0: out = new parameters (out may alias p);
// write_delta != 0: out = new - old, p untouched (the async mode pushes this delta).
extern "C" __global__ void adamw_update(float* out, const float* p, const float* g, float* m,
                                        float* v, const float* decay_mask, int n, float lr,
                                        float beta1, float beta2, float eps, float weight_decay,
                                        float bc1, float bc2, float grad_scale, int write_delta) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float grad = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * grad;
        float vi = beta2 * v[i] + (1.0f - beta2) * grad * grad;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i];
        float upd = -lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * decay_mask[i] * pi);
        out[i] = write_delta ? upd : pi + upd;
    }
}
