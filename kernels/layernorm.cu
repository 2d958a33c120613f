// LayerNorm over the last axis: x (N,C) -> out (N,C), saving mean and rstd (N,) for backward.
// One warp per row (llm.c's layout); blockDim must be a multiple of 32.
// x, out, dout and dx are float32, or bf16 in the *_bf16 entry points (statistics, weights and
// their gradients float32 always); residual_layernorm_forward_bf16 fuses the residual add before it.
#include "bf16.cuh"

__device__ float ln_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// float4 register paths: C % 4 == 0 and C <= 32 lanes * 4 * LN_MAXV, pointers 16-byte aligned.
#define LN_MAXV 8

__device__ bool ln_vec_ok(int C) { return C % 4 == 0 && C <= 128 * LN_MAXV; }

__device__ bool ln_aligned(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// One warp's row of the scalar path, any storage S. With fx, the input is x + fx rounded to S
// and written to res (by the lane that reads it, so res may alias x or fx); two passes over the
// row for the statistics (the variance from the mean: more accurate than E[x^2] - m^2).
template <typename S>
__device__ void layernorm_forward_row(S* out, float* mean, float* rstd, const S* x, const S* fx, S* res,
                                      const float* w, const float* b, int row, int C, float eps) {
    int lane = threadIdx.x % 32;
    long long off = (long long)row * C;
    const S* xr = x + off;
    if (fx != nullptr) {
        for (int c = lane; c < C; c += 32) st(res + off, c, ld(xr, c) + ld(fx + off, c));
        xr = res + off;  // each lane reads back only what it wrote
    }
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += ld(xr, c);
    float m = ln_warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = ld(xr, c) - m;
        v += d * d;
    }
    float r = 1.0f / sqrtf(ln_warp_sum(v) / C + eps);
    for (int c = lane; c < C; c += 32) st(out + off, c, (ld(xr, c) - m) * r * w[c] + b[c]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// The bf16 register path (16-byte loads of 8 values): C % 8 == 0, C <= 256 * LN_MAXV8, the
// activation pointers 16-byte aligned; each lane keeps its at most 32 values of the row.
#define LN_MAXV8 4

__device__ bool ln_bf16_vec_ok(int C, const void* a, const void* b, const void* c, const void* d) {
    return C % 8 == 0 && C <= 256 * LN_MAXV8 && bf16_aligned8(a, b, c) && bf16_aligned8(d, d, d);
}

__device__ void layernorm_forward_row_bf16x8(bf16_t* out, float* mean, float* rstd, const bf16_t* x, const bf16_t* fx,
                                             bf16_t* res, const float* w, const float* b, int row, int C, float eps) {
    int lane = threadIdx.x % 32;
    long long off = (long long)row * C;
    int n8 = C / 8;
    bf16x8 v[LN_MAXV8];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_MAXV8; i++) {
        int c = lane + 32 * i;
        if (c < n8) {
            v[i] = load8(x + off + 8 * c);
            if (fx != nullptr) {
                bf16x8 f = load8(fx + off + 8 * c);
#pragma unroll
                for (int k = 0; k < 8; k++) v[i].v[k] = bf16_to_f32(f32_to_bf16(v[i].v[k] + f.v[k]));
                store8(res + off + 8 * c, v[i]);
            }
#pragma unroll
            for (int k = 0; k < 8; k++) s += v[i].v[k];
        }
    }
    float m = ln_warp_sum(s) / C;
    float q = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_MAXV8; i++) {
        if (lane + 32 * i < n8) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float d = v[i].v[k] - m;
                q += d * d;
            }
        }
    }
    float r = 1.0f / sqrtf(ln_warp_sum(q) / C + eps);
#pragma unroll
    for (int i = 0; i < LN_MAXV8; i++) {
        int c = lane + 32 * i;
        if (c < n8) {
            bf16x8 y;
#pragma unroll
            for (int k = 0; k < 8; k++) y.v[k] = (v[i].v[k] - m) * r * w[8 * c + k] + b[8 * c + k];
            store8(out + off + 8 * c, y);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* x,
                                             const float* w, const float* b, int N, int C,
                                             float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // whole warp leaves together, so later shuffles stay full-warp
    const float* xr = x + (long long)row * C;
    if (ln_vec_ok(C) && ln_aligned(x) && ln_aligned(out) && ln_aligned(w) && ln_aligned(b)) {
        // float4 path: the row stays in registers (C <= 1024), x is read from memory once
        int n4 = C / 4;
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        float4 v[LN_MAXV];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            int c = lane + 32 * i;
            v[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < n4) {
                v[i] = x4[c];
                s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
            }
        }
        float m = ln_warp_sum(s) / C;
        float q = 0.0f;
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            if (lane + 32 * i < n4) {
                float a = v[i].x - m, bb = v[i].y - m, cc = v[i].z - m, d = v[i].w - m;
                q += (a * a + bb * bb) + (cc * cc + d * d);
            }
        }
        float r = 1.0f / sqrtf(ln_warp_sum(q) / C + eps);
        float4* o4 = reinterpret_cast<float4*>(out + (long long)row * C);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        const float4* b4 = reinterpret_cast<const float4*>(b);
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            int c = lane + 32 * i;
            if (c < n4) {
                float4 ww = w4[c], bv = b4[c], y;
                y.x = (v[i].x - m) * r * ww.x + bv.x;
                y.y = (v[i].y - m) * r * ww.y + bv.y;
                y.z = (v[i].z - m) * r * ww.z + bv.z;
                y.w = (v[i].w - m) * r * ww.w + bv.w;
                o4[c] = y;
            }
        }
        if (lane == 0) {
            mean[row] = m;
            rstd[row] = r;
        }
        return;
    }
    layernorm_forward_row(out, mean, rstd, x, (const float*)nullptr, (float*)nullptr, w, b, row, C, eps);
}

extern "C" __global__ void layernorm_forward_bf16(bf16_t* out, float* mean, float* rstd, const bf16_t* x,
                                                  const float* w, const float* b, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    if (ln_bf16_vec_ok(C, out, x, x, x)) {
        layernorm_forward_row_bf16x8(out, mean, rstd, x, nullptr, nullptr, w, b, row, C, eps);
    } else {
        layernorm_forward_row(out, mean, rstd, x, (const bf16_t*)nullptr, (bf16_t*)nullptr, w, b, row, C, eps);
    }
}

// res = x + fx (rounded to bf16, the residual stream), out = LayerNorm(res): the residual add
// fused into the LayerNorm that follows it, one pass less over the stream. res may alias x or fx.
extern "C" __global__ void residual_layernorm_forward_bf16(bf16_t* res, bf16_t* out, float* mean, float* rstd,
                                                           const bf16_t* x, const bf16_t* fx, const float* w,
                                                           const float* b, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    if (ln_bf16_vec_ok(C, out, x, fx, res)) {
        layernorm_forward_row_bf16x8(out, mean, rstd, x, fx, res, w, b, row, C, eps);
    } else {
        layernorm_forward_row(out, mean, rstd, x, fx, res, w, b, row, C, eps);
    }
}

// out = (x - mean) * rstd * w + b from a forward's kept input and statistics: the LayerNorm's
// output again (model.recompute = "gelu+ln"), the same expression as the forward's, so the same
// bits. One thread per value, grid-stride; any storage S.
template <typename S>
__device__ void layernorm_recompute_values(S* out, const S* x, const float* w, const float* b, const float* mean,
                                           const float* rstd, long long n, int C) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        long long row = i / C;
        int c = (int)(i - row * C);
        st(out, i, (ld(x, i) - mean[row]) * rstd[row] * w[c] + b[c]);
    }
}

extern "C" __global__ void layernorm_recompute(float* out, const float* x, const float* w, const float* b,
                                               const float* mean, const float* rstd, int N, int C) {
    layernorm_recompute_values(out, x, w, b, mean, rstd, (long long)N * C, C);
}

extern "C" __global__ void layernorm_recompute_bf16(bf16_t* out, const bf16_t* x, const float* w, const float* b,
                                                    const float* mean, const float* rstd, int N, int C) {
    layernorm_recompute_values(out, x, w, b, mean, rstd, (long long)N * C, C);
}

// dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
// accumulate != 0 adds into dx (residual stream) instead of overwriting it.
template <typename S>
__device__ void layernorm_backward_dx_rows(S* dx, const S* dout, const S* x, const float* w, const float* mean,
                                           const float* rstd, int N, int C, int accumulate) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    long long off = (long long)row * C;
    float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dn = ld(dout, off + c) * w[c];
        s1 += dn;
        s2 += dn * (ld(x, off + c) - m) * r;
    }
    float mean1 = ln_warp_sum(s1) / C;
    float mean2 = ln_warp_sum(s2) / C;
    for (int c = lane; c < C; c += 32) {
        float norm = (ld(x, off + c) - m) * r;
        float g = r * (ld(dout, off + c) * w[c] - mean1 - norm * mean2);
        st(dx, off + c, accumulate ? ld(dx, off + c) + g : g);
    }
}

extern "C" __global__ void layernorm_backward_dx(float* dx, const float* dout, const float* x,
                                                 const float* w, const float* mean,
                                                 const float* rstd, int N, int C, int accumulate) {
    layernorm_backward_dx_rows(dx, dout, x, w, mean, rstd, N, C, accumulate);
}

// The bf16 register path of the dx pass: dout's and x's values of the row stay in registers.
__device__ void layernorm_backward_dx_row_bf16x8(bf16_t* dx, const bf16_t* dout, const bf16_t* x, const float* w,
                                                 float m, float r, long long off, int C, int accumulate) {
    int lane = threadIdx.x % 32;
    int n8 = C / 8;
    bf16x8 dn[LN_MAXV8], nx[LN_MAXV8];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_MAXV8; i++) {
        int c = lane + 32 * i;
        if (c < n8) {
            dn[i] = load8(dout + off + 8 * c);
            nx[i] = load8(x + off + 8 * c);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                dn[i].v[k] *= w[8 * c + k];
                nx[i].v[k] = (nx[i].v[k] - m) * r;
                s1 += dn[i].v[k];
                s2 += dn[i].v[k] * nx[i].v[k];
            }
        }
    }
    float mean1 = ln_warp_sum(s1) / C;
    float mean2 = ln_warp_sum(s2) / C;
#pragma unroll
    for (int i = 0; i < LN_MAXV8; i++) {
        int c = lane + 32 * i;
        if (c < n8) {
            bf16x8 g;
            if (accumulate) g = load8(dx + off + 8 * c);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float v = r * (dn[i].v[k] - mean1 - nx[i].v[k] * mean2);
                g.v[k] = accumulate ? g.v[k] + v : v;
            }
            store8(dx + off + 8 * c, g);
        }
    }
}

extern "C" __global__ void layernorm_backward_dx_bf16(bf16_t* dx, const bf16_t* dout, const bf16_t* x,
                                                      const float* w, const float* mean,
                                                      const float* rstd, int N, int C, int accumulate) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    if (ln_bf16_vec_ok(C, dx, dout, x, x)) {
        layernorm_backward_dx_row_bf16x8(dx, dout, x, w, mean[row], rstd[row], (long long)row * C, C, accumulate);
    } else {
        layernorm_backward_dx_rows(dx, dout, x, w, mean, rstd, N, C, accumulate);
    }
}

// Deterministic dw/db, pass 1: thread (c, chunk) sums rows [chunk*rows, (chunk+1)*rows) in
// order; partial is (2, P, C) with P = gridDim.y: dw partials then db partials.
template <typename S>
__device__ void layernorm_backward_params_rows(float* partial, const S* dout, const S* x, const float* mean,
                                               const float* rstd, int N, int C, int rows) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int p = blockIdx.y;
    if (c >= C) return;
    int lo = p * rows;
    int hi = min(N, lo + rows);
    float dw = 0.0f, db = 0.0f;
    for (int r = lo; r < hi; r++) {
        long long i = (long long)r * C + c;
        float d = ld(dout, i);
        dw += d * (ld(x, i) - mean[r]) * rstd[r];
        db += d;
    }
    long long P = gridDim.y;
    partial[(long long)p * C + c] = dw;
    partial[(P + p) * C + c] = db;
}

extern "C" __global__ void layernorm_backward_params_partial(float* partial, const float* dout,
                                                             const float* x, const float* mean,
                                                             const float* rstd, int N, int C,
                                                             int rows) {
    layernorm_backward_params_rows(partial, dout, x, mean, rstd, N, C, rows);
}

extern "C" __global__ void layernorm_backward_params_partial_bf16(float* partial, const bf16_t* dout,
                                                                  const bf16_t* x, const float* mean,
                                                                  const float* rstd, int N, int C,
                                                                  int rows) {
    layernorm_backward_params_rows(partial, dout, x, mean, rstd, N, C, rows);
}

// Pass 2: dw[c] += sum_p partial[0,p,c]; db[c] += sum_p partial[1,p,c]. Block of 32 columns
// (lane) x nk = blockDim.x / 32 slices (warp k sums p = k, k + nk, ... in order); the slices are
// then added in k order, so the result has the same bits on every run. blockDim.x <= 1024,
// a multiple of 32; grid = ceil(C / 32).
extern "C" __global__ void layernorm_backward_params_finish(float* dw, float* db,
                                                            const float* partial, int P, int C) {
    __shared__ float sw[1024];
    __shared__ float sb[1024];
    int lane = threadIdx.x % 32;
    int k = threadIdx.x / 32;
    int nk = blockDim.x / 32;
    int c = blockIdx.x * 32 + lane;
    float a = 0.0f, z = 0.0f;
    if (c < C) {
        for (int p = k; p < P; p += nk) {
            a += partial[(long long)p * C + c];
            z += partial[(long long)(P + p) * C + c];
        }
    }
    sw[threadIdx.x] = a;
    sb[threadIdx.x] = z;
    __syncthreads();
    if (k == 0 && c < C) {
        float ta = 0.0f, tb = 0.0f;
        for (int j = 0; j < nk; j++) {
            ta += sw[j * 32 + lane];
            tb += sb[j * 32 + lane];
        }
        dw[c] += ta;
        db[c] += tb;
    }
}

// Fused dx and dw/db partials for the float4 path (C % 4 == 0, C <= 128 * LN_MAXV, all pointers
// 16-byte aligned; the caller checks). Block p handles rows [p*rows, min(N, (p+1)*rows)); warp k
// of nw takes rows p*rows + k, + nw, ... in order and keeps its dw/db sums in registers; the warps'
// sums are added in warp order through shared memory and written to partial (2, P, C),
// P = gridDim.x, like layernorm_backward_params_partial's output. blockDim.x a multiple of 32.
extern "C" __global__ void layernorm_backward_fused(float* dx, float* partial, const float* dout,
                                                    const float* x, const float* w,
                                                    const float* mean, const float* rstd, int N,
                                                    int C, int accumulate, int rows) {
    __shared__ float4 acc[2 * 32 * LN_MAXV];
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    int nw = blockDim.x / 32;
    int n4 = C / 4;
    int p = blockIdx.x;
    int lo = p * rows;
    int hi = min(N, lo + rows);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float4 dwa[LN_MAXV], dba[LN_MAXV];
#pragma unroll
    for (int i = 0; i < LN_MAXV; i++) {
        dwa[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        dba[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (int row = lo + warp; row < hi; row += nw) {
        long long off = (long long)row * C;
        const float4* d4 = reinterpret_cast<const float4*>(dout + off);
        const float4* x4 = reinterpret_cast<const float4*>(x + off);
        float4* g4 = reinterpret_cast<float4*>(dx + off);
        float m = mean[row], r = rstd[row];
        float4 dv[LN_MAXV], nv[LN_MAXV];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            int c = lane + 32 * i;
            dv[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            nv[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (c < n4) {
                float4 xv = x4[c];
                dv[i] = d4[c];
                nv[i].x = (xv.x - m) * r;
                nv[i].y = (xv.y - m) * r;
                nv[i].z = (xv.z - m) * r;
                nv[i].w = (xv.w - m) * r;
            }
        }
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            int c = lane + 32 * i;
            if (c < n4) {
                float4 ww = w4[c];
                float a = dv[i].x * ww.x, bb = dv[i].y * ww.y;
                float cc = dv[i].z * ww.z, d = dv[i].w * ww.w;
                s1 += (a + bb) + (cc + d);
                s2 += (a * nv[i].x + bb * nv[i].y) + (cc * nv[i].z + d * nv[i].w);
            }
        }
        float mean1 = ln_warp_sum(s1) / C;
        float mean2 = ln_warp_sum(s2) / C;
#pragma unroll
        for (int i = 0; i < LN_MAXV; i++) {
            int c = lane + 32 * i;
            if (c < n4) {
                float4 ww = w4[c], g;
                g.x = r * (dv[i].x * ww.x - mean1 - nv[i].x * mean2);
                g.y = r * (dv[i].y * ww.y - mean1 - nv[i].y * mean2);
                g.z = r * (dv[i].z * ww.z - mean1 - nv[i].z * mean2);
                g.w = r * (dv[i].w * ww.w - mean1 - nv[i].w * mean2);
                if (accumulate) {
                    float4 old = g4[c];
                    g.x += old.x;
                    g.y += old.y;
                    g.z += old.z;
                    g.w += old.w;
                }
                g4[c] = g;
                dwa[i].x += dv[i].x * nv[i].x;
                dwa[i].y += dv[i].y * nv[i].y;
                dwa[i].z += dv[i].z * nv[i].z;
                dwa[i].w += dv[i].w * nv[i].w;
                dba[i].x += dv[i].x;
                dba[i].y += dv[i].y;
                dba[i].z += dv[i].z;
                dba[i].w += dv[i].w;
            }
        }
    }
    for (int k = 0; k < nw; k++) {
        if (warp == k) {
#pragma unroll
            for (int i = 0; i < LN_MAXV; i++) {
                int c = lane + 32 * i;
                if (c < n4) {
                    if (k == 0) {
                        acc[c] = dwa[i];
                        acc[n4 + c] = dba[i];
                    } else {
                        float4 t = acc[c], u = acc[n4 + c];
                        t.x += dwa[i].x;
                        t.y += dwa[i].y;
                        t.z += dwa[i].z;
                        t.w += dwa[i].w;
                        u.x += dba[i].x;
                        u.y += dba[i].y;
                        u.z += dba[i].z;
                        u.w += dba[i].w;
                        acc[c] = t;
                        acc[n4 + c] = u;
                    }
                }
            }
        }
        __syncthreads();
    }
    float4* part4 = reinterpret_cast<float4*>(partial);
    long long P = gridDim.x;
    for (int c = threadIdx.x; c < n4; c += blockDim.x) {
        part4[(long long)p * n4 + c] = acc[c];
        part4[(P + p) * n4 + c] = acc[n4 + c];
    }
}
