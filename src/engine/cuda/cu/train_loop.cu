// the training loop's reduction and guard kernels (loaded by train/reduce.rs): CUDA C compiled at run time by NVRTC.

#define THREADS 256

// The block's sum of every thread's s, in a fixed tree, into *out.
__device__ void block_sum(double s, double* out) {
    __shared__ double part[THREADS];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = part[0];
}

// Block k: the sum of squares (in double) of buffer a[k], or of a[k] - b[k] when b is given (the f32 difference,
// as the CPU monitor takes it), over lens[k] values, into out[k].
extern "C" __global__ void sum_squares(const float* const* a, const float* const* b, const long long* lens,
                                       double* out) {
    int k = blockIdx.x;
    const float* x = a[k];
    const float* y = b ? b[k] : 0;
    double s = 0.0;
    for (long long i = threadIdx.x; i < lens[k]; i += THREADS) {
        float v = y ? __fsub_rn(x[i], y[i]) : x[i];
        s += (double)v * (double)v;
    }
    block_sum(s, out + k);
}

// As sum_squares without b, over buffers of bf16 bits (a bf16 trainer's activations).
extern "C" __global__ void sum_squares_bf16(const unsigned short* const* a, const long long* lens, double* out) {
    int k = blockIdx.x;
    const unsigned short* x = a[k];
    double s = 0.0;
    for (long long i = threadIdx.x; i < lens[k]; i += THREADS) {
        double v = (double)__uint_as_float(((unsigned int)x[i]) << 16);
        s += v * v;
    }
    block_sum(s, out + k);
}

// out[0] = the loss; out[1] = the rows of logits [n, c] whose label's logit no other exceeds (the CPU's top-1
// `hits`, ties counted as hits).
extern "C" __global__ void loss_hits(const float* logits, const int* labels, const float* loss, int n, int c,
                                     double* out) {
    __shared__ int part[THREADS];
    int h = 0;
    for (int r = threadIdx.x; r < n; r += THREADS) {
        const float* z = logits + (long long)r * c;
        float t = z[labels[r]];
        int better = 0;
        for (int j = 0; j < c; ++j) better += z[j] > t;
        h += better == 0;
    }
    part[threadIdx.x] = h;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = (double)loss[0];
        out[1] = (double)part[0];
    }
}

// Buffer a[blockIdx.y] times c, rounded as the CPU's `*v *= c` (CpuSteps::scale_gradients).
extern "C" __global__ void scale_all(float* const* a, const long long* lens, float c) {
    float* x = a[blockIdx.y];
    long long n = lens[blockIdx.y];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], c);
}
