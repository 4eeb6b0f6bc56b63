//! CUDA kernels (feature `cuda`): the device, cuDNN convolutions and batch norm, cuBLAS for the classifier, and
//! the NVRTC-compiled element-wise kernels (`cu/*.cu`), for inference (this folder) and training (`train/`).
//!
//! This layer knows buffers, shapes and precisions, never a model, a recipe or an optimiser: the executors that
//! walk `model::Graph` on the device (`CudaResNet`, `CudaTrainer`) are `exec::cuda`, whose header describes the
//! design (what is cached, fusion, layouts, precision, training).
//!
//! Every failure is an `Error` with one line: no driver (libcuda missing), no device or a wrong index, a missing
//! cuDNN, cuBLAS or NVRTC (with the pip packages and LD_LIBRARY_PATH to fix it), a library too old for a function
//! we call. `cudarc` loads the libraries at run time, so the binary builds without a CUDA toolkit and finds
//! libcuda, libcudnn.so.9, libcublas and libnvrtc (.so.13 or .so.12) when it runs. One stream carries all work,
//! so stream order is program order.

pub(crate) mod conv;
pub(crate) mod device;
pub(crate) mod kernels;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod train;
