// float32 <-> bfloat16 (round to nearest even, bf16.cuh), for the bf16 copies of the weights
// and for the kernels that still take float32 where the activations are bf16 (model.dtype = "bf16").
// Grid-stride; float4 loads and 8-byte stores when both pointers allow it.
#include "bf16.cuh"

extern "C" __global__ void cast_to_bf16(unsigned short* out, const float* in, long long n) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long start = 0;
    if (((reinterpret_cast<unsigned long long>(in) & 15ull) | (reinterpret_cast<unsigned long long>(out) & 7ull)) == 0) {
        long long n4 = n / 4;
        const float4* in4 = reinterpret_cast<const float4*>(in);
        ushort4* out4 = reinterpret_cast<ushort4*>(out);
        for (long long i = tid; i < n4; i += stride) {
            float4 v = in4[i];
            out4[i] = make_ushort4(f32_to_bf16(v.x), f32_to_bf16(v.y), f32_to_bf16(v.z), f32_to_bf16(v.w));
        }
        start = 4 * n4;
    }
    for (long long i = start + tid; i < n; i += stride) out[i] = f32_to_bf16(in[i]);
}

extern "C" __global__ void cast_from_bf16(float* out, const bf16_t* in, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = bf16_to_f32(in[i]);
}
