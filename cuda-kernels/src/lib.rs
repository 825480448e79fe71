//! CUDA C sources of rlx's GPU kernels, embedded as strings and compiled at run time with NVRTC
//! for the device's compute capability (`rlx::backend::cuda`). Each module is compiled as
//! [`COMMON`] (bf16 conversions, warp/block reductions, counter-based random numbers) followed
//! by its own source, so NVRTC needs no include path.
//!
//! Storage is f32 or bf16 (raw 16-bit patterns), accumulation always f32. Matrix products of
//! f32 weights go to cuBLAS; `matmul_bf16w` multiplies f32 activations by bf16 weights.

/// One `.cu` translation unit and the kernels (`extern "C" __global__`) it defines.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// Stable name, used as the cache key of the compiled module.
    pub name: &'static str,
    /// CUDA C source (without [`COMMON`]).
    pub source: &'static str,
    /// The entry points the module must export.
    pub kernels: &'static [&'static str],
}

impl Module {
    /// The full translation unit NVRTC compiles.
    pub fn full_source(&self) -> String {
        format!(
            "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}.cu\"\n{}",
            self.name, self.source
        )
    }
}

/// Helpers every module starts with.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel module the CUDA backend compiles.
pub const ALL: &[Module] = &[
    Module {
        name: "embedding",
        source: include_str!("../kernels/embedding.cu"),
        kernels: &["embedding_fwd_bf16", "embedding_fwd_f32", "embedding_bwd"],
    },
    Module {
        name: "norm",
        source: include_str!("../kernels/norm.cu"),
        kernels: &[
            "rmsnorm_fwd",
            "rmsnorm_bwd",
            "layernorm_fwd",
            "layernorm_bwd",
        ],
    },
    Module {
        name: "rope",
        source: include_str!("../kernels/rope.cu"),
        kernels: &["rope_fwd", "rope_bwd"],
    },
    Module {
        name: "activation",
        source: include_str!("../kernels/activation.cu"),
        kernels: &["swiglu_fwd", "swiglu_bwd", "gelu_tanh_fwd", "gelu_tanh_bwd"],
    },
    Module {
        name: "attention",
        source: include_str!("../kernels/attention.cu"),
        kernels: &[
            "attention_decode_paged",
            "attention_decode_paged_f32",
            "kv_cache_append",
            "kv_cache_append_f32",
            "attention_prefill_fwd",
            "attention_bwd_delta",
            "attention_prefill_bwd",
        ],
    },
    Module {
        name: "logsoftmax",
        source: include_str!("../kernels/logsoftmax.cu"),
        kernels: &["logsoftmax_gather_fwd", "logsoftmax_gather_bwd"],
    },
    Module {
        name: "sampling",
        source: include_str!("../kernels/sampling.cu"),
        kernels: &["sample_rows"],
    },
    Module {
        name: "matmul",
        source: include_str!("../kernels/matmul.cu"),
        kernels: &["matmul_bf16w"],
    },
    Module {
        name: "adamw",
        source: include_str!("../kernels/adamw.cu"),
        kernels: &["adamw_step"],
    },
    Module {
        name: "reduce",
        source: include_str!("../kernels/reduce.cu"),
        kernels: &[
            "sum_squares",
            "scale_in_place",
            "axpy_in_place",
            "add_in_place",
            "f32_to_bf16_kernel",
            "bf16_to_f32_kernel",
            "add_bias_rows",
        ],
    },
];

/// The module called `name`.
pub fn module(name: &str) -> Option<&'static Module> {
    ALL.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_once_in_its_source() {
        for m in ALL {
            for k in m.kernels {
                let needle = format!("__global__ void {k}(");
                assert_eq!(m.source.matches(&needle).count(), 1, "{} in {}", k, m.name);
            }
            // And nothing is exported that the list does not name.
            assert_eq!(
                m.source.matches("extern \"C\" __global__").count(),
                m.kernels.len(),
                "{}",
                m.name
            );
        }
    }
}
