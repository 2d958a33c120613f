// Global sum of squares of a flat float buffer, deterministic: pass 1 gives one double per
// block from a fixed grid-stride split (same grid -> same bits); pass 2 sums those in one block.
// Doubles because the buffer can hold ~1e8 values; the cost is hidden behind memory reads.

__device__ double gn_block_sum(double v) {
    __shared__ double warp_sums[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    int nw = blockDim.x / 32;
    v = lane < nw ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;  // every thread holds the block total
}

extern "C" __global__ void sumsq_partial(double* partial, const float* x, int n) {
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        double xi = x[i];
        acc += xi * xi;
    }
    double total = gn_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Launch with one block: out[0] = sum of partial[0..P).
extern "C" __global__ void sumsq_finish(double* out, const double* partial, int P) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < P; i += blockDim.x) acc += partial[i];
    double total = gn_block_sum(acc);
    if (threadIdx.x == 0) out[0] = total;
}
