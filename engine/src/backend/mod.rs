//! Where a stage's layers run: the compute-backend seam.
//!
//! A slice is loaded *onto* a [`Backend`] and runs there: the backend owns the slice's
//! weights and the KV caches it makes ([`crate::arch::ModelSlice::new_cache`]), and rows
//! cross to and from host memory only at the stage's boundaries (`embed` takes token ids,
//! `forward_layers` takes and returns the step's hidden rows, `head` returns logits). That
//! is what lets a GPU backend keep everything in device memory between those points.
//!
//! Only the CPU backend exists today: host `Vec<f32>` rows, weights in GGUF block format
//! ([`crate::quant::QMatrix`]), the f16 [`crate::kv_cache::SequenceCache`], and a
//! [`ComputePool`] of threads. Its kernels are capped by [`Isa::detect`] (`POTLUCK_ISA=scalar`
//! or `avx2` caps every one of them: matmuls, attention, SwiGLU).
//!
//! **Architecture Invariant:** code outside the engine picks a backend (`Backend::cpu`) and
//! never reaches into it: no caller touches a backend's threads, buffers or kernels.

use crate::quant::Isa;
use crate::threads::ComputePool;

/// The kinds of backend, as `worker bench`, `Hello` and the planner name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Cpu,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
        }
    }
}

/// A compute backend with its resources.
#[derive(Debug)]
pub enum Backend {
    Cpu(CpuBackend),
}

/// The CPU backend: the engine's SIMD kernels on a pool of threads.
#[derive(Debug)]
pub struct CpuBackend {
    pool: ComputePool,
}

impl Backend {
    /// The CPU backend with `threads` compute threads (1: the kernels run inline on the
    /// calling thread).
    pub fn cpu(threads: usize) -> std::sync::Arc<Backend> {
        std::sync::Arc::new(Backend::Cpu(CpuBackend { pool: ComputePool::new(threads) }))
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Cpu(_) => BackendKind::Cpu,
        }
    }

    /// Compute threads this backend drives.
    pub fn threads(&self) -> usize {
        match self {
            Backend::Cpu(cpu) => cpu.pool.n_threads(),
        }
    }

    /// One line for logs: the backend, its kernels and threads.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu(cpu) => format!("cpu ({:?} kernels, {} threads)", Isa::detect(), cpu.pool.n_threads()),
        }
    }

    /// The CPU backend's threads. Architectures run their CPU path through it; a GPU
    /// backend will give them its own path instead.
    pub(crate) fn pool(&self) -> &ComputePool {
        match self {
            Backend::Cpu(cpu) => &cpu.pool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_backend_says_what_it_runs() {
        let backend = Backend::cpu(2);
        assert_eq!(backend.kind(), BackendKind::Cpu);
        assert_eq!(backend.threads(), 2);
        assert!(backend.describe().starts_with("cpu ("), "{}", backend.describe());
    }
}
