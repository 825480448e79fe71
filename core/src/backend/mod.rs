//! Compute backends: the CPU backend runs everything; the CUDA side (feature `cuda`) finds the
//! driver, NVRTC and cuBLAS, compiles the kernels, and runs a model's inference (logits,
//! log-probs, generation) on a device — compiled, not yet run on a GPU.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{Error, Result};

/// Where a model runs: `cpu`, or a CUDA device (`cuda` = `cuda:0`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        let bad = || {
            Error::invalid(format!(
                "unknown device `{s}` (expected cpu, cuda or cuda:N)"
            ))
        };
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How a CUDA device stores a model: `f32` (the default: the CPU's f32 values, products
/// through cuBLAS SGEMM), or `bf16`: the matrices (linear weights, embeddings, LM head) and
/// the KV cache rounded to bf16 — half the device memory — with every product and softmax
/// still accumulated in f32. A Trainer trains an f32 copy (f32 master weights and moments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for DeviceDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<DeviceDtype> {
        match s.trim() {
            "f32" | "float32" => Ok(DeviceDtype::F32),
            "bf16" | "bfloat16" => Ok(DeviceDtype::Bf16),
            other => Err(Error::invalid(format!(
                "unknown device dtype `{other}` (expected f32 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for DeviceDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceDtype::F32 => "f32",
            DeviceDtype::Bf16 => "bf16",
        })
    }
}

impl Device {
    /// Ok when a model can run here. For `cuda:N` the driver and the device are checked, so
    /// the error says what is missing (NVRTC and cuBLAS are checked when the model is copied
    /// to the device).
    pub fn check_usable(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => cuda::check_device(n),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::Cuda(
                "this build of rlx has no CUDA support (crate feature `cuda`)".into(),
            )),
        }
    }
}
