// the fp32 training kernels (loaded by train/kernels.rs): CUDA C compiled at run time by NVRTC.

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// ReLU as the CPU's relu1: negative to 0, NaN kept.
__device__ __forceinline__ float relu1(float v) { return v < 0.0f ? 0.0f : v; }
// The CPU's relu_backward: the gradient is dropped where the ReLU's output is <= 0 (and kept where it is NaN).
__device__ __forceinline__ float keep(float g, float out) { return out <= 0.0f ? 0.0f : g; }

// a = relu(a), in place.
extern "C" __global__ void relu_fwd(float* a, long long n) {
    float4* a4 = reinterpret_cast<float4*>(a);
    GRID_STRIDE(i, n / 4) {
        float4 v = a4[i];
        v.x = relu1(v.x); v.y = relu1(v.y); v.z = relu1(v.z); v.w = relu1(v.w);
        a4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; a[i] = relu1(a[i]); }
}

// a = relu(a + r), in place: the residual join.
extern "C" __global__ void add_relu_fwd(float* a, const float* r, long long n) {
    float4* a4 = reinterpret_cast<float4*>(a);
    const float4* r4 = reinterpret_cast<const float4*>(r);
    GRID_STRIDE(i, n / 4) {
        float4 v = a4[i], w = r4[i];
        v.x = relu1(v.x + w.x); v.y = relu1(v.y + w.y); v.z = relu1(v.z + w.z); v.w = relu1(v.w + w.w);
        a4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; a[i] = relu1(a[i] + r[i]); }
}

// g = g masked by the ReLU output y, in place.
extern "C" __global__ void relu_mask(float* g, const float* y, long long n) {
    float4* g4 = reinterpret_cast<float4*>(g);
    const float4* y4 = reinterpret_cast<const float4*>(y);
    GRID_STRIDE(i, n / 4) {
        float4 v = g4[i], o = y4[i];
        v.x = keep(v.x, o.x); v.y = keep(v.y, o.y); v.z = keep(v.z, o.z); v.w = keep(v.w, o.w);
        g4[i] = v;
    }
    GRID_STRIDE(j, n % 4) { long long i = n / 4 * 4 + j; g[i] = keep(g[i], y[i]); }
}

// 3x3 max-pool, stride 2, padding 1, recording the winner's index within its plane: the first maximum in scan
// order, NaN winning, as the CPU engine (and PyTorch).
extern "C" __global__ void max_pool_fwd(const float* x, float* y, int* arg, long long planes, int h, int w,
                                        int oh, int ow) {
    GRID_STRIDE(i, planes * oh * ow) {
        int ox = (int)(i % ow);
        int oy = (int)((i / ow) % oh);
        const float* p = x + (i / ((long long)ow * oh)) * h * w;
        float best = 0.0f;
        int at = 0;
        bool first = true;
        for (int iy = max(oy * 2 - 1, 0); iy < min(oy * 2 + 2, h); ++iy) {
            for (int ix = max(ox * 2 - 1, 0); ix < min(ox * 2 + 2, w); ++ix) {
                float v = p[iy * w + ix];
                if (first || v > best || v != v) { best = v; at = iy * w + ix; first = false; }
            }
        }
        y[i] = best;
        arg[i] = at;
    }
}

// The max-pool's input gradient, gathered (each input takes the outputs whose window chose it, in output order,
// as the CPU's scatter adds them), then masked by the ReLU output y that fed the pool.
extern "C" __global__ void max_pool_bwd(const float* dy, const int* arg, const float* y, float* dx, long long planes,
                                        int h, int w, int oh, int ow) {
    GRID_STRIDE(i, planes * h * w) {
        int ix = (int)(i % w);
        int iy = (int)((i / w) % h);
        long long base = (i / ((long long)w * h)) * oh * ow;
        int me = iy * w + ix;
        float s = 0.0f;
        for (int oy = iy / 2; oy <= min((iy + 1) / 2, oh - 1); ++oy) {
            for (int ox = ix / 2; ox <= min((ix + 1) / 2, ow - 1); ++ox) {
                long long o = base + oy * ow + ox;
                if (arg[o] == me) s += dy[o];
            }
        }
        dx[i] = keep(s, y[i]);
    }
}

// The global average pool's input gradient dy[plane]/HW, masked by the ReLU output y it pooled.
extern "C" __global__ void avg_pool_bwd(const float* dy, const float* y, float* dx, long long total, int plane) {
    GRID_STRIDE(i, total) { dx[i] = keep(dy[i / plane] / (float)plane, y[i]); }
}

// Softmax cross-entropy against target rows q, as the CPU engine (in double): loss = mean_r −Σ q·log p and
// dlogits = (p·Σq − q)/N. One block: warp w takes rows w, w + warps, ...; the loss is summed in a fixed order.
// Then, after the block's barrier, the column sums of dlogits: the fc bias gradient.
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void softmax_xent(const float* logits, const float* q, float* grad, float* bias_grad,
                                        float* loss, int n, int c) {
    __shared__ double partial[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    double acc = 0.0;
    for (int r = warp; r < n; r += warps) {
        const float* z = logits + (long long)r * c;
        const float* t = q + (long long)r * c;
        double m = __longlong_as_double(0xfff0000000000000ULL); // -inf
        for (int j = lane; j < c; j += 32) m = fmax(m, (double)z[j]);
        for (int o = 16; o > 0; o /= 2) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
        double e = 0.0, qs = 0.0;
        for (int j = lane; j < c; j += 32) { e += exp((double)z[j] - m); qs += (double)t[j]; }
        double log_z = m + log(warp_sum(e));
        qs = warp_sum(qs);
        double l = 0.0;
        for (int j = lane; j < c; j += 32) {
            double log_p = (double)z[j] - log_z;
            l -= (double)t[j] * log_p;
            grad[(long long)r * c + j] = (float)((exp(log_p) * qs - (double)t[j]) / (double)n);
        }
        acc += warp_sum(l);
    }
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int k = 0; k < warps; ++k) total += partial[k];
        loss[0] = (float)(total / (double)(n > 0 ? n : 1));
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < n; ++r) s += grad[(long long)r * c + j];
        bias_grad[j] = s;
    }
}

// One SGD step of one parameter, torch's single-tensor order: d = g (+ wd·w); with momentum m, buf = d on the
// first step and buf·m + d after, d = nesterov ? d + m·buf : buf; w += −lr·d. Rounded as the CPU rounds.
extern "C" __global__ void sgd(float* w, const float* g, float* buf, long long n, float neg_lr, float wd, float m,
                               int nesterov, int first) {
    GRID_STRIDE(i, n) {
        float p = w[i];
        float d = wd != 0.0f ? __fadd_rn(g[i], __fmul_rn(wd, p)) : g[i];
        if (m != 0.0f) {
            float b = first ? d : __fadd_rn(__fmul_rn(buf[i], m), d);
            buf[i] = b;
            d = nesterov ? __fadd_rn(d, __fmul_rn(m, b)) : b;
        }
        w[i] = __fadd_rn(p, __fmul_rn(neg_lr, d));
    }
}
