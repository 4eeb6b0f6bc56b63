//! The CUDA executors (feature `cuda`): ResNet inference (`CudaResNet`) and training (`CudaTrainer`) resident on
//! one NVIDIA GPU. Each walks `model::Graph` once into a plan over the kernels of `engine::cuda`.
//!
//! # API
//!
//! ```ignore
//! use resnet_rs::exec::cuda::CudaResNet;
//! let mut gpu = CudaResNet::new(&model, 0, batch, 224, 224)?; // device cuda:0, up to `batch` images of 224²
//! let logits = gpu.forward(&images)?;                         // host [N, 3, 224, 224] in, host [N, classes] out
//! gpu.download_into(&mut model)?;                             // device weights back into the model
//! ```
//!
//! Training (`train/`):
//!
//! ```ignore
//! use resnet_rs::exec::cuda::{CudaTrainer, TrainOptimizer};
//! let opt = TrainOptimizer { kind: OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
//!                            groups: Optimizer::groups_for(&model.store.params, 5e-4, true, 1.0) };
//! let mut gpu = CudaTrainer::new(&model, 0, batch, 32, 32, Precision::F32, opt)?;
//! let loss = gpu.step(&images, &targets, lr)?;  // forward (train-mode BN), loss, backward, SGD update
//! gpu.download_into(&mut model)?;               // weights, BN running statistics, batch count: for checkpoints
//! ```
//!
//! `CudaTrainer::new(.., Precision::Bf16, ..)` trains in bf16 mixed precision (see Precision below).
//!
//! `CudaResNet::with_precision(.., Precision::Tf32)` lets cuDNN and cuBLAS use TF32;
//! `Precision::Bf16` runs the network on bf16 NHWC activations (see Precision below). Failures are the kernel
//! layer's one-line `Error`s (`engine::cuda`).
//!
//! # Design
//!
//! - **An executor, not a `Backend`.** The engine's `Tensor` is a host `Vec<f32>` and the `Backend` trait passes
//!   host tensors, so a per-op CUDA backend would copy every activation to the device and back on every op. Like
//!   llm.c, `CudaResNet` instead runs the fixed ResNet graph: it walks the model's `Graph` once into a list of
//!   nodes over activation slots (checking every tensor name and shape against the store, and that no tensor is
//!   left over),
//!   uploads parameters and BN buffers once, and runs the whole forward on the device. Only the images go in and
//!   the logits come out.
//! - **What is cached.** Per batch size, a plan: cuDNN descriptors and the algorithm of every convolution. The
//!   algorithm comes from cuDNN's timed search (`cudnnFindConvolutionForwardAlgorithm`), run once per distinct
//!   convolution shape and kept in a map by shape, so the stages' repeated blocks and later batch sizes reuse it.
//!   Activations live in three slots sized for the largest layer at the largest batch (a block needs its input or
//!   shortcut, a unit's input and a unit's output at once), plus one workspace grown to the largest algorithm's
//!   need; nothing is allocated per forward. BN is folded into a per-channel scale and shift at upload.
//! - **Fusion.** After each convolution one kernel applies the folded BN, the residual add and the ReLU.
//! - **Layout.** fp32 runs NCHW, the layout of the engine's tensors and of PyTorch checkpoints, so nothing is
//!   transposed on the way in or out. bf16 runs NHWC (tensor cores want channels innermost): one kernel converts the
//!   staged fp32 NCHW images to bf16 NHWC, and the conv weights are converted to bf16 OHWI once at upload.
//! - **Precision.** fp32 by default, or bf16 as PyTorch's autocast does it (inference here; training under
//!   Training below): convolution operands in bf16 with fp32
//!   accumulation, BN + residual + ReLU computed in fp32 from bf16 inputs and rounded once, global pooling and the
//!   classifier in fp32, fp32 master weights. In fp32, TF32 is off by default: convolution descriptors carry `CUDNN_FMA_MATH` (cuDNN's
//!   `DEFAULT_MATH` would allow TF32 on Ampere and later) and algorithms reporting tensor-op math are skipped;
//!   cuBLAS keeps `CUBLAS_DEFAULT_MATH`. `Precision::Tf32` switches both.
//! - **Training** (`CudaTrainer`) has the CPU engine's step semantics: batch statistics, running statistics with
//!   momentum 0.1 and the unbiased variance (cuDNN's training BN, which is what PyTorch runs), mean softmax
//!   cross-entropy against target rows, torch.optim's SGD (momentum, Nesterov, weight-decay groups, first step
//!   buf = grad) in the CPU's operation order. Every activation backward needs has its own buffer (each unit's
//!   convolution output and BN/ReLU output, the max-pool's winners), allocated for the largest batch at
//!   construction; gradients pass through three scratch buffers; forward, backward-data and backward-filter
//!   algorithms are searched once per shape. A block's residual gradient costs nothing: the first convolution's
//!   backward data accumulates onto it (cuDNN beta 1). ReLU masks fuse into the pooling backward kernels, the fc
//!   bias gradient into the loss kernel. One SGD launch per parameter; the host waits once per step, for the loss.
//!   Only SGD runs on the device so far (Adam/AdamW are refused with an error). With `bf16` the trainer follows
//!   PyTorch's autocast on channels-last tensors (`engine::cuda::train::half`): activations and their gradients are bf16 NHWC,
//!   convolutions read bf16 inputs and a bf16 OHWI copy of each fp32 master weight (converted again after every
//!   update) and accumulate in fp32; cuDNN's bf16 weight gradient is widened into the fp32 gradient; batch norm
//!   runs on the trainer's own NHWC kernels (per-channel sums in double, fp32 scale, shift, running and saved
//!   statistics; normalise + residual + ReLU in one pass rounded once); pooling output, fc, loss, gradients of
//!   parameters and the SGD state stay fp32; no loss scaling. For the training loop
//!   (`resnet train --device cuda`) a step also splits in two, `forward_backward` then `apply_update`, with
//!   `check_step` between: one read of the loss, the top-1 hits and each gradient's and BN statistic's sum of
//!   squares (`loop_ops` over `engine::cuda::train::reduce`: per-buffer reductions in double through pointer tables uploaded once), plus
//!   gradient scaling, device copies of the BN statistics and weights, and momentum buffers out and in.

mod executor;
mod table;
mod trainer;

pub use executor::CudaResNet;
pub use trainer::{CudaTrainer, StepCheck, TrainOptimizer};

/// Compare `text` with the committed `tests/fixtures/cuda_graphs/NAME` (rewritten when
/// `RESNET_WRITE_FIXTURES=1`): how the device graphs' tests pin a pure function of the model without a GPU.
#[cfg(test)]
fn pinned(name: &str, text: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cuda_graphs").join(name);
    if std::env::var_os("RESNET_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("fixture folder");
        std::fs::write(&path, text).expect("fixture written");
    }
    let want = std::fs::read_to_string(&path).expect("fixture present (RESNET_WRITE_FIXTURES=1 writes it)");
    for (i, (got, want)) in text.lines().zip(want.lines()).enumerate() {
        assert_eq!(got, want, "{name}: line {} differs", i + 1);
    }
    assert_eq!(text.lines().count(), want.lines().count(), "{name}: line count differs");
}
