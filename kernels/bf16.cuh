// bfloat16 storage, shared by the kernels that read or write bf16 activations (model.dtype =
// "bf16"). A bf16 value travels as its 16-bit pattern (CuPy has no bfloat16 dtype: uint16
// arrays), so nothing here needs cuda_bf16.h; arithmetic is always float32, only storage is bf16.
// ld/st are overloaded on the storage type, so one kernel template serves float32 and bf16
// arrays. llmpi.gpu.loader pastes this file in place of its #include (NVRTC gets one source).
#ifndef LLMPI_BF16_CUH
#define LLMPI_BF16_CUH

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

// round to nearest even; a NaN stays a (quiet) NaN
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }

// Eight bf16 values in one 16-byte load or store (a uint4: element 2k in the low half of word k).
// The vector paths need 16-byte aligned pointers and whole groups of 8 (bf16_aligned8).
struct bf16x8 {
    float v[8];
};

__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ bf16x8 load8(const bf16_t* p) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    bf16x8 r;
    r.v[0] = bf16_lo(u.x); r.v[1] = bf16_hi(u.x); r.v[2] = bf16_lo(u.y); r.v[3] = bf16_hi(u.y);
    r.v[4] = bf16_lo(u.z); r.v[5] = bf16_hi(u.z); r.v[6] = bf16_lo(u.w); r.v[7] = bf16_hi(u.w);
    return r;
}

__device__ __forceinline__ void store8(bf16_t* p, const bf16x8& r) {
    uint4 u;
    u.x = bf16_pair(r.v[0], r.v[1]);
    u.y = bf16_pair(r.v[2], r.v[3]);
    u.z = bf16_pair(r.v[4], r.v[5]);
    u.w = bf16_pair(r.v[6], r.v[7]);
    *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ bool bf16_aligned8(const void* a, const void* b, const void* c) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b) |
             reinterpret_cast<unsigned long long>(c)) & 15ull) == 0;
}

#endif
