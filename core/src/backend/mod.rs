//! Compute backends. Only the CPU backend exists today; the CUDA backend (cudarc + NVRTC kernels)
//! comes with its own issue and will implement the same operations.

pub mod cpu;
