//! The arithmetic a network runs in: the one precision type that the CPU kernels, the CUDA kernels and every
//! executor above them take (`--dtype` parses into it; `target` resolves it against the device).

use crate::error::{Error, Result};

/// The arithmetic a network runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// IEEE fp32 throughout (the parity tests' setting).
    F32,
    /// fp32 storage, TF32 tensor-core convolutions and matrix products (PyTorch's default for convolutions on
    /// a GPU). About 1e-3 relative error.
    Tf32,
    /// bf16 convolution operands with fp32 accumulation (PyTorch's bf16 autocast); on a GPU also bf16 NHWC
    /// activations, on the CPU (AVX512-BF16, inference only) f32 activations between convolutions.
    Bf16,
    /// int8 convolution operands (weights per channel, inputs per tensor from a `resnet quantize` calibration)
    /// with i32 accumulation, f32 between convolutions; CPU inference only.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            _ => Err(Error::invalid(format!("unknown dtype '{s}' (expected f32, tf32, bf16 or int8)"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        })
    }
}
