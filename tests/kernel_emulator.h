// The subset of CUDA that kernels/*.cu use, on the CPU: each CUDA thread of a block is a host
// thread, __syncthreads and the warp operations are barriers over those threads. Included
// before a kernel file by tests/kernel_emulator.py, which also swaps the two inline-PTX
// instructions the kernels use (cvt.rna.tf32.f32 and mma.sync m16n8k8 tf32) for
// emu_tf32/emu_mma below. One block runs at a time; blockDim must be a multiple of 32.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

using std::max;
using std::min;

#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct emu_dim3 { unsigned x, y, z; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline ushort4 make_ushort4(unsigned short x, unsigned short y, unsigned short z, unsigned short w) {
    return {x, y, z, w};
}

inline thread_local emu_dim3 threadIdx;
inline emu_dim3 blockIdx, blockDim, gridDim;

constexpr int EMU_MAX_WARPS = 32;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::barrier<>* emu_warp_barrier[EMU_MAX_WARPS];
inline unsigned char emu_lane_slot[EMU_MAX_WARPS][32][8];  // one value per lane for shuffles
inline unsigned emu_fragment[EMU_MAX_WARPS][32][6];         // a0..a3, b0, b1 per lane for mma

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __int_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { return __int_as_float(u); }

template <class T> T emu_shuffle(T v, int src_lane) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    std::memcpy(emu_lane_slot[w][l], &v, sizeof(T));
    emu_warp_barrier[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, emu_lane_slot[w][src_lane & 31], sizeof(T));
    emu_warp_barrier[w]->arrive_and_wait();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu_shuffle(v, (int)(threadIdx.x % 32) ^ mask); }
template <class T> T __shfl_sync(unsigned, T v, int lane) { return emu_shuffle(v, lane); }

// cvt.rna.tf32.f32: 10 mantissa bits, round to nearest with ties away from zero
inline unsigned emu_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}

// One warp-wide mma.sync, d += A (16 x K) B (K x 8): every lane hands its registers a0..a3, b0, b1
// to the warp, each lane rebuilds A and B with unpack(registers, g, t, A, B) for every lane
// (lane = 4g + t) and computes its own four elements of D, at (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1).
template <int K, class Unpack>
inline void emu_mma_k(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, Unpack unpack) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    for (int i = 0; i < 4; i++) emu_fragment[w][l][i] = a[i];
    emu_fragment[w][l][4] = b0;
    emu_fragment[w][l][5] = b1;
    emu_warp_barrier[w]->arrive_and_wait();
    float A[16][K], B[K][8];
    for (int lane = 0; lane < 32; lane++) unpack(emu_fragment[w][lane], lane / 4, lane % 4, A, B);
    emu_warp_barrier[w]->arrive_and_wait();
    int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; e++) {
        int r = g + 8 * (e >> 1), c = 2 * t + (e & 1);
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += A[r][k] * B[k][c];
        d[e] += s;
    }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA layout): A a0..a3 at (g,t)
// (g+8,t) (g,t+4) (g+8,t+4); B b0,b1 at (t,g) (t+4,g). The hardware ignores the low 13 bits.
inline void emu_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    emu_mma_k<8>(d, a, b0, b1, [](const unsigned* f, int g, int t, float (&A)[16][8], float (&B)[8][8]) {
        A[g][t] = __uint_as_float(f[0] & 0xffffe000u);
        A[g + 8][t] = __uint_as_float(f[1] & 0xffffe000u);
        A[g][t + 4] = __uint_as_float(f[2] & 0xffffe000u);
        A[g + 8][t + 4] = __uint_as_float(f[3] & 0xffffe000u);
        B[t][g] = __uint_as_float(f[4] & 0xffffe000u);
        B[t + 4][g] = __uint_as_float(f[5] & 0xffffe000u);
    });
}

// cvt.rn.bf16x2.f32: hi and lo rounded to bf16 (nearest even), hi in the upper half.
inline unsigned emu_bf16_bits(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
inline unsigned emu_bf16x2(float hi, float lo) { return (emu_bf16_bits(hi) << 16) | emu_bf16_bits(lo); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA layout), two bf16 per register,
// the lower column (A) or row (B) in the low half: A registers at (g, 2t..2t+1) (g+8, 2t..2t+1)
// (g, 2t+8..2t+9) (g+8, 2t+8..2t+9); B registers at rows 2t..2t+1 and 2t+8..2t+9 of column g.
inline void emu_mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    emu_mma_k<16>(d, a, b0, b1, [](const unsigned* f, int g, int t, float (&A)[16][16], float (&B)[16][8]) {
        for (int h = 0; h < 2; h++) {  // the low, then the high half of each register
            auto value = [h](unsigned reg) { return __uint_as_float(((reg >> (16 * h)) & 0xffffu) << 16); };
            A[g][2 * t + h] = value(f[0]);
            A[g + 8][2 * t + h] = value(f[1]);
            A[g][2 * t + 8 + h] = value(f[2]);
            A[g + 8][2 * t + 8 + h] = value(f[3]);
            B[2 * t + h][g] = value(f[4]);
            B[2 * t + 8 + h][g] = value(f[5]);
        }
    });
}

// A returned thread stops counting at the barriers, as an exited CUDA thread does.
inline void emu_end_thread() {
    emu_block_barrier->arrive_and_drop();
    emu_warp_barrier[threadIdx.x / 32]->arrive_and_drop();
}

// Runs a (gx, gy) grid of blocks of `threads` threads, one block at a time, each CUDA thread a
// host thread calling kernel() (the entry point with its arguments bound), then retiring.
// kernel_emulator.py generates one extern "C" emu_launch_<name> per entry point around this.
template <class Kernel>
void emu_run_grid(unsigned gx, unsigned gy, unsigned threads, Kernel kernel) {
    gridDim = {gx, gy, 1};
    blockDim = {threads, 1, 1};
    for (unsigned by = 0; by < gy; by++)
        for (unsigned bx = 0; bx < gx; bx++) {
            blockIdx = {bx, by, 0};
            std::barrier<> block(threads);
            std::deque<std::barrier<>> warps;  // barriers cannot move: no vector
            for (unsigned w = 0; w < threads / 32; w++) warps.emplace_back(32);
            emu_block_barrier = &block;
            for (unsigned w = 0; w < threads / 32; w++) emu_warp_barrier[w] = &warps[w];
            std::vector<std::thread> pool;
            pool.reserve(threads);
            for (unsigned tx = 0; tx < threads; tx++)
                pool.emplace_back([&kernel, tx] {
                    threadIdx = {tx, 0, 0};
                    kernel();
                    emu_end_thread();
                });
            for (auto& t : pool) t.join();
        }
}

