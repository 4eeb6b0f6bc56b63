// bf16 as unsigned short bits and its conversions (prepended by kernels.rs and train/half.rs): CUDA C compiled at run time by NVRTC.

typedef unsigned short bf16;
__device__ __forceinline__ float bf16_to_f32(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }
// Round to nearest even, NaN kept a (quiet) NaN: the rounding PyTorch's .to(torch.bfloat16) does.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
