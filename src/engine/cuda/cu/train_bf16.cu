// the bf16 mixed-precision training kernels (loaded by train/half.rs after bf16.cuh): CUDA C compiled at run time by NVRTC.

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)
#define ROWS 8

// The CPU's relu_backward: the gradient is dropped where the ReLU's output is <= 0 (and kept where it is NaN).
__device__ __forceinline__ float keep(float g, float out) { return out <= 0.0f ? 0.0f : g; }

// Per-channel partial sums over x [rows, c] (bf16, channel innermost). Block (bx, by) takes channels bx*32.. and
// rows by*ROWS + ty, stepping gridDim.y*ROWS; it writes part[by][0][ch] and part[by][1][ch]:
// forward (dy null): Σx and Σx²; backward: Σdy and Σdy·x̂ with x̂ = (x − mean)·invstd.
extern "C" __global__ void bn_partials(const bf16* x, const bf16* dy, const float* mean, const float* invstd,
                                       double* part, long long rows, int c) {
    __shared__ double s0[ROWS][32], s1[ROWS][32];
    int tx = threadIdx.x, ty = threadIdx.y;
    int ch = blockIdx.x * 32 + tx;
    double a = 0.0, b = 0.0;
    if (ch < c) {
        float m = dy ? mean[ch] : 0.0f, is = dy ? invstd[ch] : 0.0f;
        for (long long r = blockIdx.y * (long long)ROWS + ty; r < rows; r += (long long)gridDim.y * ROWS) {
            float v = bf16_to_f32(x[r * c + ch]);
            if (dy) {
                float g = bf16_to_f32(dy[r * c + ch]);
                a += (double)g;
                b += (double)g * (double)((v - m) * is);
            } else {
                a += (double)v;
                b += (double)v * (double)v;
            }
        }
    }
    s0[ty][tx] = a;
    s1[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && ch < c) {
        for (int k = 1; k < ROWS; ++k) { a += s0[k][tx]; b += s1[k][tx]; }
        part[((long long)blockIdx.y * 2) * c + ch] = a;
        part[((long long)blockIdx.y * 2 + 1) * c + ch] = b;
    }
}

// Forward statistics, one thread per channel: the batch mean and biased variance from the partial sums; saved
// mean and 1/σ for backward; the folded scale = γ/σ and shift = β − mean·scale; the running statistics moved by
// `momentum` with the unbiased variance (PyTorch's train-mode BN).
extern "C" __global__ void bn_stats(const double* part, int splits, long long rows, int c, const float* gamma,
                                    const float* beta, float* rmean, float* rvar, float* save_mean, float* save_invstd,
                                    float* scale, float* shift, float eps, float momentum) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, q = 0.0;
    for (int k = 0; k < splits; ++k) { s += part[(2LL * k) * c + ch]; q += part[(2LL * k + 1) * c + ch]; }
    double mean = s / (double)rows;
    double var = q / (double)rows - mean * mean;
    if (var < 0.0) var = 0.0;
    float is = (float)(1.0 / sqrt(var + (double)eps));
    float m = (float)mean;
    save_mean[ch] = m;
    save_invstd[ch] = is;
    float sc = gamma[ch] * is;
    scale[ch] = sc;
    shift[ch] = beta[ch] - m * sc;
    float unbiased = (float)(var * (double)rows / (double)(rows > 1 ? rows - 1 : 1));
    rmean[ch] = (1.0f - momentum) * rmean[ch] + momentum * m;
    rvar[ch] = (1.0f - momentum) * rvar[ch] + momentum * unbiased;
}

// Backward parameter gradients, one thread per channel: dβ = Σdy, dγ = Σdy·x̂ (overwritten).
extern "C" __global__ void bn_param_grads(const double* part, int splits, int c, float* dgamma, float* dbeta) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, q = 0.0;
    for (int k = 0; k < splits; ++k) { s += part[(2LL * k) * c + ch]; q += part[(2LL * k + 1) * c + ch]; }
    dbeta[ch] = (float)s;
    dgamma[ch] = (float)q;
}

// dx = γ·invstd·(dy − dβ/M − x̂·dγ/M), x̂ = (x − mean)·invstd, over [rows, c] bf16 (dx may not alias x or dy).
extern "C" __global__ void bn_backward(const bf16* x, const bf16* dy, bf16* dx, const float* mean,
                                       const float* invstd, const float* gamma, const float* dgamma,
                                       const float* dbeta, long long rows, int c) {
    float inv_m = 1.0f / (float)rows;
    GRID_STRIDE(i, rows * c) {
        int ch = (int)(i % c);
        float is = invstd[ch];
        float xh = (bf16_to_f32(x[i]) - mean[ch]) * is;
        float g = bf16_to_f32(dy[i]) - dbeta[ch] * inv_m - xh * dgamma[ch] * inv_m;
        dx[i] = f32_to_bf16(gamma[ch] * is * g);
    }
}

// g = g masked by the ReLU output y, in place (bf16).
extern "C" __global__ void relu_mask_bf16(bf16* g, const bf16* y, long long n) {
    GRID_STRIDE(i, n) { g[i] = f32_to_bf16(keep(bf16_to_f32(g[i]), bf16_to_f32(y[i]))); }
}

// 3x3/2/p1 max-pool of bf16 NHWC x [n, h, w, c] into y [n, oh, ow, c], recording the winner's position iy*w + ix in
// its plane: the first maximum in scan order, NaN winning, as the fp32 trainer's max_pool_fwd.
extern "C" __global__ void max_pool_fwd_bf16(const bf16* x, bf16* y, int* arg, long long n, int c, int h, int w,
                                             int oh, int ow) {
    GRID_STRIDE(i, n * oh * ow * c) {
        int ch = (int)(i % c);
        long long p = i / c;
        int ox = (int)(p % ow);
        int oy = (int)((p / ow) % oh);
        long long b = p / ((long long)ow * oh);
        float best = 0.0f;
        int at = 0;
        bool first = true;
        for (int iy = max(oy * 2 - 1, 0); iy < min(oy * 2 + 2, h); ++iy) {
            for (int ix = max(ox * 2 - 1, 0); ix < min(ox * 2 + 2, w); ++ix) {
                float v = bf16_to_f32(x[((b * h + iy) * w + ix) * c + ch]);
                if (first || v > best || v != v) { best = v; at = iy * w + ix; first = false; }
            }
        }
        y[i] = f32_to_bf16(best);
        arg[i] = at;
    }
}

// The max-pool's input gradient (NHWC), gathered in fp32 from the outputs whose window chose each input, masked
// by the ReLU output y that fed the pool, rounded once.
extern "C" __global__ void max_pool_bwd_bf16(const bf16* dy, const int* arg, const bf16* y, bf16* dx, long long n,
                                             int c, int h, int w, int oh, int ow) {
    GRID_STRIDE(i, n * h * w * c) {
        int ch = (int)(i % c);
        long long p = i / c;
        int ix = (int)(p % w);
        int iy = (int)((p / w) % h);
        long long b = p / ((long long)w * h);
        int me = iy * w + ix;
        float s = 0.0f;
        for (int oy = iy / 2; oy <= min((iy + 1) / 2, oh - 1); ++oy) {
            for (int ox = ix / 2; ox <= min((ix + 1) / 2, ow - 1); ++ox) {
                long long o = ((b * oh + oy) * ow + ox) * c + ch;
                if (arg[o] == me) s += bf16_to_f32(dy[o]);
            }
        }
        dx[i] = f32_to_bf16(keep(s, bf16_to_f32(y[i])));
    }
}

// The global average pool's input gradient: dx[b, s, ch] = dy[b, ch]/hw (fp32 dy), masked by the pooled ReLU
// output y, as bf16 NHWC.
extern "C" __global__ void avg_pool_bwd_bf16(const float* dy, const bf16* y, bf16* dx, long long n, int c, int hw) {
    GRID_STRIDE(i, n * hw * c) {
        long long b = i / ((long long)hw * c);
        int ch = (int)(i % c);
        dx[i] = f32_to_bf16(keep(dy[b * c + ch] / (float)hw, bf16_to_f32(y[i])));
    }
}

// bf16 [n, hw, c] → fp32 [n, c, hw]: weight gradients OHWI → OIHW (n = O, c = I, hw = kh·kw).
extern "C" __global__ void to_f32_nchw(const bf16* x, float* y, long long n, int c, int hw) {
    GRID_STRIDE(i, n * c * hw) {
        int s = (int)(i % hw);
        int ch = (int)((i / hw) % c);
        long long b = i / ((long long)hw * c);
        y[i] = bf16_to_f32(x[(b * hw + s) * c + ch]);
    }
}
