// the inference kernels in fp32 (loaded by kernels.rs): CUDA C compiled at run time by NVRTC.

// Eval-mode batch norm as y = x*scale + shift: scale = gamma / sqrt(var + eps), shift = beta - mean*scale.
extern "C" __global__ void bn_fold(const float* gamma, const float* beta, const float* mean, const float* var,
                                   float eps, float* scale, float* shift, int channels) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < channels) {
        float s = gamma[c] / sqrtf(var[c] + eps);
        scale[c] = s;
        shift[c] = beta[c] - mean[c] * s;
    }
}

// y = x*scale[c] + shift[c] (+ res), then ReLU if asked; y may be x (in place). A null res means no residual.
// ReLU lets NaN through (NaN < 0 is false), so a numeric guard downstream still sees it.
extern "C" __global__ void scale_shift_act(float* y, const float* x, const float* res, const float* scale,
                                           const float* shift, long long total, long long plane, int channels,
                                           int relu) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) {
        int c = (int)((i / plane) % channels);
        float v = x[i] * scale[c] + shift[c];
        if (res) v += res[i];
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = v;
    }
}

// 3x3 max-pool, stride 2, padding 1 with -inf padding (the ImageNet stem's); NaN wins, as in PyTorch.
extern "C" __global__ void max_pool_3x3s2(const float* x, float* y, long long planes, int h, int w, int oh, int ow) {
    long long total = planes * oh * ow;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) {
        int ox = (int)(i % ow);
        int oy = (int)((i / ow) % oh);
        const float* p = x + (i / ((long long)ow * oh)) * h * w;
        float m = -__int_as_float(0x7f800000);
        for (int ky = 0; ky < 3; ++ky) {
            int iy = oy * 2 - 1 + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < 3; ++kx) {
                int ix = ox * 2 - 1 + kx;
                if (ix < 0 || ix >= w) continue;
                float v = p[iy * w + ix];
                if (v > m || v != v) m = v;
            }
        }
        y[i] = m;
    }
}

// Mean of each plane: one warp per plane. The warp index is uniform within a warp, so a warp exits as a whole and
// the shuffles always see 32 active lanes.
extern "C" __global__ void global_avg_pool(const float* x, float* y, int planes, int plane) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= planes) return;
    const float* p = x + (long long)warp * plane;
    float s = 0.0f;
    for (int i = lane; i < plane; i += 32) s += p[i];
    for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) y[warp] = s / (float)plane;
}

