// float32 -> bfloat16 with round-to-nearest-even, for the bf16 GEMM inputs (model.dtype = "bf16").
// bf16 values travel as their 16-bit patterns (CuPy has no bfloat16 dtype: uint16 arrays), so
// the rounding is done on the bits and the kernel needs no cuda_bf16.h. NaN stays a (quiet) NaN.
// Grid-stride; float4 loads and 8-byte stores when both pointers allow it.

__device__ __forceinline__ unsigned short cast_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

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
            out4[i] = make_ushort4(cast_bf16_bits(v.x), cast_bf16_bits(v.y), cast_bf16_bits(v.z),
                                   cast_bf16_bits(v.w));
        }
        start = 4 * n4;
    }
    for (long long i = start + tid; i < n; i += stride) out[i] = cast_bf16_bits(in[i]);
}
