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

// Launch with one block: factor[0] = the clip's scale for the norm sqrt(sumsq[0]), as
// llmpi.model.layers.gradnorm.clip_factor: max_norm / (norm + 1e-6) above max_norm, else 1, so
// the clip needs no trip through the host (a captured step reads it in adamw_update_from).
extern "C" __global__ void clip_factor(float* factor, const double* sumsq, float max_norm) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double norm = sqrt(sumsq[0]);
        factor[0] = (max_norm > 0.0f && norm > (double)max_norm) ? (float)((double)max_norm / (norm + 1e-6)) : 1.0f;
    }
}
