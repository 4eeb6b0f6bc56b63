//! A network ready for eval-mode forwards on its target (`crate::target`): the CPU engine is always there, the
//! CUDA executor only in builds with the `cuda` feature.

use crate::engine::Tensor;
use crate::error::{Error, Result};
use crate::exec::cpu_plan::CpuPlan;
use crate::infer::quantize::Calibration;
use crate::model::{ResNet, Tap};
use crate::target::{Job, Precision, Target};

/// Why `--dtype int8` cannot run a file.
pub const NOT_QUANTIZED: &str =
    "--dtype int8 needs weights written by `resnet quantize` (they carry the calibration); these have none";

/// A network ready to run eval-mode forwards on its device.
pub enum Runner {
    /// The model's inference plan: folded batch norm and kept convolution weights per graph unit.
    Cpu(Box<CpuPlan>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::exec::cuda::CudaResNet>),
}

impl Runner {
    /// The CPU in f32, in bf16 where the CPU has AVX512-BF16 (which `Target::resolve` has checked), or in int8
    /// with `calibration`.
    fn cpu(model: ResNet, precision: Precision, calibration: Option<&Calibration>) -> Result<Runner> {
        let plan = match precision {
            Precision::Int8 => {
                let calibration = calibration.ok_or_else(|| Error::invalid(NOT_QUANTIZED))?;
                let plan = CpuPlan::int8(model, |conv| calibration.input(conv))?;
                if !crate::engine::cpu::isa::avx512_vnni() {
                    eprintln!(
                        "note: this CPU lacks AVX512-VNNI: int8 runs AVX2 or portable products, slower than f32 here"
                    );
                }
                plan
            }
            _ => CpuPlan::new(model, precision == Precision::Bf16)
                .ok_or_else(|| Error::invalid("this CPU lacks AVX512-BF16"))?,
        };
        Ok(Runner::Cpu(Box::new(plan)))
    }

    /// Put `model` on `target` (resolved for inference: refusals and `auto` in `Target::resolve`) for batches of
    /// up to `batch` images of `h`×`w`; `calibration` (a `resnet quantize` file's) for `--dtype int8`.
    pub fn open(
        model: ResNet,
        target: Target,
        calibration: Option<&Calibration>,
        batch: usize,
        h: usize,
        w: usize,
    ) -> Result<Runner> {
        let cpu = |model, p| Runner::cpu(model, p, calibration);
        #[cfg(feature = "cuda")]
        let gpu = |model: &ResNet, i, p| {
            let gpu = crate::exec::cuda::CudaResNet::with_precision(model, i, batch, h, w, p)?;
            Ok(Runner::Cuda(Box::new(gpu)))
        };
        #[cfg(not(feature = "cuda"))]
        let gpu = |_: &ResNet, _, _| -> Result<Runner> {
            let _ = (batch, h, w);
            Err(Error::invalid(crate::target::NO_GPU_BUILD))
        };
        target.resolve(Job::Infer)?.open(model, cpu, gpu)
    }

    /// "cpu", or the GPU's name.
    pub fn describe(&self) -> String {
        match self {
            Runner::Cpu(plan) if plan.is_bf16() => "cpu (bf16)".into(),
            Runner::Cpu(plan) if plan.is_int8() => "cpu (int8)".into(),
            Runner::Cpu(..) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.device_name(),
        }
    }

    /// Logits `[N, classes]` for images `[N, 3, H, W]`.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        match self {
            Runner::Cpu(plan) => Ok(plan.forward(x)),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.forward(x),
        }
    }

    /// `[N, D]` features at `tap`, as `infer::features` computes them on the CPU.
    pub fn features(&mut self, x: &Tensor, tap: Tap) -> Result<Tensor> {
        match self {
            Runner::Cpu(plan) => Ok(plan.features(x, tap)),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.features(x, tap),
        }
    }

    /// One eval forward of `x` per call, for timing. On a GPU `x` is uploaded once and each call runs the network
    /// on the device copy and waits for it, as PyTorch's GPU benchmarks time batches already on the device.
    pub fn timed_forward<'a>(&'a mut self, x: &'a Tensor) -> Result<Box<dyn FnMut() -> Result<()> + 'a>> {
        match self {
            Runner::Cpu(plan) => Ok(Box::new(move || {
                plan.forward(x);
                Ok(())
            })),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => {
                let n = gpu.stage(x)?;
                Ok(Box::new(move || gpu.run_staged(n)))
            }
        }
    }
}
