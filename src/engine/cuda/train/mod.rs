//! The training kernels: convolution backward (data and filter, algorithms searched per shape), training-mode
//! batch norm (cuDNN in fp32; our own NHWC kernels in bf16), the fc forward/backward, the loss, SGD, bf16
//! conversions (`half`) and the training loop's reductions (`reduce`). `exec::cuda::CudaTrainer` drives them.

pub(crate) mod conv;
pub(crate) mod half;
pub(crate) mod kernels;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod reduce;
