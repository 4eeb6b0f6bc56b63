// the inference kernels on bf16 NHWC activations (loaded by kernels.rs after bf16.cuh): CUDA C compiled at run time by NVRTC.


// fp32 [N, C, HW] → bf16 [N, HW, C]: images, and conv weights OIHW → OHWI (N = O, C = I, HW = kh·kw).
extern "C" __global__ void to_bf16_nhwc(const float* x, bf16* y, long long n, int c, int hw) {
    long long total = n * c * hw;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) {
        int ch = (int)(i % c);
        long long p = i / c;
        int s = (int)(p % hw);
        long long b = p / hw;
        y[i] = f32_to_bf16(x[(b * c + ch) * hw + s]);
    }
}

// bf16 NHWC y = act(x*scale[c] + shift[c] (+ res)), fp32 arithmetic; y may be x. With `vec8` (C % 8 == 0 and
// 16-byte aligned buffers) each thread moves 8 values per 16-byte access; otherwise one value.
extern "C" __global__ void scale_shift_act_bf16(bf16* y, const bf16* x, const bf16* res, const float* scale,
                                                const float* shift, long long total, int channels, int relu,
                                                int vec8) {
    long long step = (long long)gridDim.x * blockDim.x;
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (vec8) {
        for (long long g = first; g < total / 8; g += step) {
            uint4 xv = ((const uint4*)x)[g];
            uint4 rv = res ? ((const uint4*)res)[g] : make_uint4(0, 0, 0, 0);
            int c0 = (int)((g * 8) % channels);
            unsigned int xs[4] = {xv.x, xv.y, xv.z, xv.w};
            unsigned int rs[4] = {rv.x, rv.y, rv.z, rv.w};
            unsigned int out[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float v[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    int c = c0 + 2 * k + h;
                    float a = bf16_to_f32((bf16)(xs[k] >> (16 * h))) * scale[c] + shift[c];
                    if (res) a += bf16_to_f32((bf16)(rs[k] >> (16 * h)));
                    if (relu && a < 0.0f) a = 0.0f;
                    v[h] = a;
                }
                out[k] = (unsigned int)f32_to_bf16(v[0]) | ((unsigned int)f32_to_bf16(v[1]) << 16);
            }
            ((uint4*)y)[g] = make_uint4(out[0], out[1], out[2], out[3]);
        }
        return;
    }
    for (long long i = first; i < total; i += step) {
        int c = (int)(i % channels);
        float v = bf16_to_f32(x[i]) * scale[c] + shift[c];
        if (res) v += bf16_to_f32(res[i]);
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = f32_to_bf16(v);
    }
}

// 3x3/2 max-pool with padding 1 on bf16 NHWC; NaN wins, as in PyTorch.
extern "C" __global__ void max_pool_3x3s2_bf16(const bf16* x, bf16* y, long long n, int c, int h, int w, int oh,
                                               int ow) {
    long long total = n * oh * ow * c;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) {
        int ch = (int)(i % c);
        long long p = i / c;
        int ox = (int)(p % ow);
        int oy = (int)((p / ow) % oh);
        long long b = p / ((long long)ow * oh);
        float m = -__int_as_float(0x7f800000);
        for (int ky = 0; ky < 3; ++ky) {
            int iy = oy * 2 - 1 + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < 3; ++kx) {
                int ix = ox * 2 - 1 + kx;
                if (ix < 0 || ix >= w) continue;
                float v = bf16_to_f32(x[((b * h + iy) * w + ix) * c + ch]);
                if (v > m || v != v) m = v;
            }
        }
        y[i] = f32_to_bf16(m);
    }
}

// fp32 [N, C] means of bf16 NHWC planes: one thread per (n, c), neighbouring threads reading neighbouring channels.
extern "C" __global__ void global_avg_pool_bf16(const bf16* x, float* y, long long n, int c, int hw) {
    long long total = n * c;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) {
        int ch = (int)(i % c);
        const bf16* p = x + (i / c) * hw * c + ch;
        float s = 0.0f;
        for (int k = 0; k < hw; ++k) s += bf16_to_f32(p[(long long)k * c]);
        y[i] = s / (float)hw;
    }
}

// y[r, j] += b[j] for a row-major [rows, cols] matrix.
extern "C" __global__ void add_bias(float* y, const float* b, int rows, int cols) {
    long long total = (long long)rows * cols;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += step) y[i] += b[i % cols];
}
