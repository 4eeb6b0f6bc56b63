//! Where inference runs: `--device cpu|cuda[:N]|auto`. The CPU engine is always there; the CUDA executor only in
//! builds with the `cuda` feature, and `auto` falls back to the CPU when no usable GPU is found.

use crate::engine::Tensor;
use crate::engine::cpu::PreparedCpu;
use crate::error::{Error, Result};
use crate::model::{Mode, ResNet, Tap};

/// The one-line error for `--device cuda` in a build without the `cuda` feature.
pub const NO_GPU_BUILD: &str =
    "this binary was built without GPU support; rebuild with `cargo build --release --features cuda`";

/// A parsed `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The first GPU when this build can use one, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| Error::invalid(format!("unknown device '{s}' (expected cpu, cuda, cuda:N or auto)"))),
        }
    }
}

/// The arithmetic a GPU runs a forward in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// IEEE fp32 throughout (the parity tests' setting).
    F32,
    /// fp32 storage, TF32 tensor-core convolutions and matrix products (PyTorch's default for convolutions).
    Tf32,
    /// bf16 convolution operands with fp32 accumulation (PyTorch's bf16 autocast); on a GPU also bf16 NHWC
    /// activations, on the CPU (AVX512-BF16) f32 activations between convolutions.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::invalid(format!("unknown dtype '{s}' (expected f32, tf32 or bf16)"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A network ready to run eval-mode forwards on its device.
pub enum Runner {
    /// The model and the backend that keeps its transformed convolution weights: the model's weights never change
    /// while the runner holds them, which is what `PreparedCpu` relies on.
    Cpu(Box<ResNet>, PreparedCpu),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::engine::cuda::CudaResNet>),
}

impl Runner {
    /// The CPU in f32, or in bf16 where the CPU has AVX512-BF16.
    fn cpu(model: ResNet, precision: Precision) -> Result<Runner> {
        let backend = match precision {
            Precision::Bf16 => PreparedCpu::bf16().ok_or_else(|| {
                Error::invalid("--dtype bf16 on the CPU needs AVX512-BF16, which this CPU lacks; use --dtype f32")
            })?,
            Precision::F32 | Precision::Tf32 => PreparedCpu::new(),
        };
        Ok(Runner::Cpu(Box::new(model), backend))
    }

    /// Put `model` on `device` for batches of up to `batch` images of `h`×`w`, in plain fp32.
    pub fn new(model: ResNet, device: DeviceSpec, batch: usize, h: usize, w: usize) -> Result<Runner> {
        Runner::with_precision(model, device, batch, h, w, Precision::F32)
    }

    /// As `new`, in `precision`. The CPU runs f32 and bf16 (AVX512-BF16 only); tf32 is a GPU mode, refused on
    /// `--device cpu` and run as f32 where `auto` falls back to the CPU.
    pub fn with_precision(
        model: ResNet,
        device: DeviceSpec,
        batch: usize,
        h: usize,
        w: usize,
        precision: Precision,
    ) -> Result<Runner> {
        if precision == Precision::Tf32 && device == DeviceSpec::Cpu {
            return Err(Error::invalid("--dtype tf32 needs a GPU (--device cuda); the CPU runs f32 and bf16"));
        }
        #[cfg(feature = "cuda")]
        let gpu = |i| {
            let options = crate::engine::cuda::CudaOptions {
                allow_tf32: precision == Precision::Tf32,
                bf16: precision == Precision::Bf16,
            };
            crate::engine::cuda::CudaResNet::with_options(&model, i, batch, h, w, options)
        };
        match device {
            DeviceSpec::Cpu => Runner::cpu(model, precision),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Ok(Runner::Cuda(Box::new(gpu(i)?))),
            #[cfg(feature = "cuda")]
            DeviceSpec::Auto => match gpu(0) {
                Ok(gpu) => Ok(Runner::Cuda(Box::new(gpu))),
                Err(_) => Runner::cpu(model, precision),
            },
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => {
                let _ = (batch, h, w);
                Err(Error::invalid(NO_GPU_BUILD))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Auto => Runner::cpu(model, precision),
        }
    }

    /// "cpu", or the GPU's name.
    pub fn describe(&self) -> String {
        match self {
            Runner::Cpu(_, backend) if backend.is_bf16() => "cpu (bf16)".into(),
            Runner::Cpu(..) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.device_name(),
        }
    }

    /// Logits `[N, classes]` for images `[N, 3, H, W]`.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        match self {
            Runner::Cpu(model, be) => Ok(model.forward(be, x, Mode::Eval)),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.forward(x),
        }
    }

    /// `[N, D]` features at `tap`, as `infer::features` computes them on the CPU.
    pub fn features(&mut self, x: &Tensor, tap: Tap) -> Result<Tensor> {
        match self {
            Runner::Cpu(model, be) => Ok(crate::infer::features(model, be, x, tap)),
            #[cfg(feature = "cuda")]
            Runner::Cuda(gpu) => gpu.features(x, tap),
        }
    }

    /// One eval forward of `x` per call, for timing. On a GPU `x` is uploaded once and each call runs the network
    /// on the device copy and waits for it, as PyTorch's GPU benchmarks time batches already on the device.
    pub fn timed_forward<'a>(&'a mut self, x: &'a Tensor) -> Result<Box<dyn FnMut() -> Result<()> + 'a>> {
        match self {
            Runner::Cpu(model, be) => Ok(Box::new(move || {
                model.forward(be, x, Mode::Eval);
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
