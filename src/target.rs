//! Where work runs and in what arithmetic: `--device cpu|cuda[:N]|auto` and `--dtype f32|tf32|bf16|int8`.
//!
//! Declared once (`TargetArgs`, flattened into every subcommand that runs the network) and resolved once
//! (`Target::resolve`): every refusal has one wording here, `auto` means the same everywhere (the first GPU when
//! this build has the `cuda` feature and the job runs there, else the CPU), and the engines take a `Precision`
//! rather than flags of their own.

pub use crate::engine::Precision;
use crate::error::{Error, Result};

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

/// Why the CPU cannot run bf16 here (inference or training).
pub const BF16_CPU: &str =
    "--dtype bf16 on the CPU needs AVX512-BF16, which this CPU lacks; use --dtype f32 (or a GPU: --device cuda)";

/// `--device` and `--dtype`, as every subcommand that runs the network takes them.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetArgs {
    /// Where to run: cpu, cuda, cuda:N, or auto (the first GPU when this build has the `cuda` feature, finds one
    /// and can run the job there; else the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32; bf16 (bf16 convolution operands with fp32 accumulation, as PyTorch's autocast: on a GPU, and on a
    /// CPU with AVX512-BF16); tf32 on a GPU (TF32 tensor-core convolutions and matrix products);
    /// int8 for CPU inference with a `resnet quantize` file.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

impl TargetArgs {
    pub fn target(&self) -> Target {
        Target { device: self.device, precision: self.dtype }
    }
}

/// What is asked of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Eval-mode forwards.
    Infer,
    /// Training steps with this optimiser (`sgd`, `adam`, `adamw`); the GPU trainer runs SGD only so far.
    Train { optimizer: &'static str },
}

/// A device and a precision, before they are checked against a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub device: DeviceSpec,
    pub precision: Precision,
}

/// Where a job runs once `Target::resolve` has accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Cpu(Precision),
    /// GPU `index` in `precision`; if opening it fails, the CPU in `fallback` (`auto`) or the error (`cuda`).
    Gpu {
        index: usize,
        precision: Precision,
        fallback: Option<Precision>,
    },
}

impl Target {
    pub const CPU: Target = Target { device: DeviceSpec::Cpu, precision: Precision::F32 };

    /// Check the target against `job` and this build and machine: one line naming the flag for what cannot run.
    pub fn resolve(self, job: Job) -> Result<Resolved> {
        let Target { device, precision } = self;
        // What the CPU runs in for this job, or why it cannot.
        let on_cpu = match (job, precision) {
            (_, Precision::F32) => Ok(Precision::F32),
            (_, Precision::Tf32) => Err("--dtype tf32 needs a GPU (--device cuda); the CPU runs f32".to_string()),
            (_, Precision::Bf16) if !crate::engine::cpu::packed::bf16_supported() => Err(BF16_CPU.to_string()),
            (_, Precision::Bf16) => Ok(Precision::Bf16),
            (Job::Train { .. }, Precision::Int8) => {
                Err("--dtype int8 is for inference (a `resnet quantize` file); training runs in f32".to_string())
            }
            (Job::Infer, Precision::Int8) => Ok(Precision::Int8),
        };
        let gpu_runs_it = match job {
            Job::Train { optimizer } if optimizer != "sgd" => {
                Err(format!("--optimizer {optimizer}: the GPU trainer runs SGD only so far (use --device cpu)"))
            }
            _ => Ok(()),
        };
        match device {
            DeviceSpec::Cpu => on_cpu.map(Resolved::Cpu).map_err(Error::invalid),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Err(Error::invalid(NO_GPU_BUILD)),
            DeviceSpec::Cuda(_) if precision == Precision::Int8 => {
                Err(Error::invalid("--dtype int8 runs on the CPU only (--device cpu)"))
            }
            DeviceSpec::Cuda(index) => {
                gpu_runs_it.map_err(Error::invalid)?;
                Ok(Resolved::Gpu { index, precision, fallback: None })
            }
            // auto falls back to the CPU in the arithmetic it runs nearest the one asked for.
            DeviceSpec::Auto => {
                let fallback = on_cpu.unwrap_or(Precision::F32);
                if cfg!(feature = "cuda") && gpu_runs_it.is_ok() && precision != Precision::Int8 {
                    Ok(Resolved::Gpu { index: 0, precision, fallback: Some(fallback) })
                } else {
                    Ok(Resolved::Cpu(fallback))
                }
            }
        }
    }
}

impl Resolved {
    /// Open the engine over `state` (the model, say): `gpu(&state, index, precision)` for a GPU,
    /// `cpu(state, precision)` for the CPU or where `auto` falls back to it.
    pub fn open<S, T>(
        self,
        state: S,
        cpu: impl FnOnce(S, Precision) -> Result<T>,
        gpu: impl FnOnce(&S, usize, Precision) -> Result<T>,
    ) -> Result<T> {
        match self {
            Resolved::Cpu(p) => cpu(state, p),
            Resolved::Gpu { index, precision, fallback } => match (gpu(&state, index, precision), fallback) {
                (Ok(engine), _) => Ok(engine),
                (Err(_), Some(p)) => cpu(state, p),
                (Err(e), None) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(device: &str, dtype: &str) -> Target {
        Target { device: device.parse().unwrap(), precision: dtype.parse().unwrap() }
    }

    #[test]
    fn refusals_and_fallbacks() {
        let train = Job::Train { optimizer: "sgd" };
        assert_eq!(target("cpu", "f32").resolve(train).unwrap(), Resolved::Cpu(Precision::F32));
        for (t, job, want) in [
            (target("cpu", "tf32"), Job::Infer, "--dtype tf32 needs a GPU"),
            (target("cpu", "int8"), train, "--dtype int8 is for inference"),
        ] {
            let e = t.resolve(job).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // bf16 trains and infers on a CPU with AVX512-BF16 and is refused in one line elsewhere.
        for job in [train, Job::Infer] {
            let got = target("cpu", "bf16").resolve(job);
            if crate::engine::cpu::packed::bf16_supported() {
                assert_eq!(got.unwrap(), Resolved::Cpu(Precision::Bf16));
            } else {
                assert_eq!(got.unwrap_err().to_string(), BF16_CPU);
            }
        }
        // int8 is CPU inference: auto takes the CPU for it, and where a build has a GPU, --device cuda refuses it.
        assert_eq!(target("cpu", "int8").resolve(Job::Infer).unwrap(), Resolved::Cpu(Precision::Int8));
        assert_eq!(target("auto", "int8").resolve(Job::Infer).unwrap(), Resolved::Cpu(Precision::Int8));
        if cfg!(feature = "cuda") {
            let e = target("cuda", "int8").resolve(Job::Infer).unwrap_err().to_string();
            assert!(e.contains("--dtype int8 runs on the CPU only"), "{e}");
        }
        // auto never refuses: a GPU dtype falls back to f32 on the CPU.
        let auto = target("auto", "tf32").resolve(Job::Train { optimizer: "adam" }).unwrap();
        assert_eq!(auto, Resolved::Cpu(Precision::F32));
        let cuda = target("cuda:1", "bf16").resolve(Job::Train { optimizer: "adamw" });
        if cfg!(feature = "cuda") {
            let e = cuda.unwrap_err().to_string();
            assert_eq!(e, "--optimizer adamw: the GPU trainer runs SGD only so far (use --device cpu)");
            let gpu = target("cuda:1", "bf16").resolve(train).unwrap();
            assert_eq!(gpu, Resolved::Gpu { index: 1, precision: Precision::Bf16, fallback: None });
        } else {
            assert_eq!(cuda.unwrap_err().to_string(), NO_GPU_BUILD);
        }
    }

    #[test]
    fn open_falls_back_only_for_auto() {
        let failing = |_: &(), _: usize, _: Precision| -> Result<&str> { Err(Error::invalid("no driver")) };
        let cpu = |_: (), p| Ok(if p == Precision::F32 { "cpu f32" } else { "?" });
        let auto = Resolved::Gpu { index: 0, precision: Precision::Tf32, fallback: Some(Precision::F32) };
        assert_eq!(auto.open((), cpu, failing).unwrap(), "cpu f32");
        let cuda = Resolved::Gpu { index: 0, precision: Precision::F32, fallback: None };
        assert_eq!(cuda.open((), cpu, failing).unwrap_err().to_string(), "no driver");
    }
}
