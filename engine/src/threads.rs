//! The compute threads of one engine. `--threads N` sizes this pool and nothing else in the
//! engine spawns threads, so the flag controls every pool (see ARCHITECTURE.md).
//!
//! Why rayon and not a spin-waiting barrier pool: a home machine is never idle, and pools that
//! spin while waiting collapse when another process holds a core (docs/peers.md: measured
//! llama.cpp `-t 2` and candle at single-digit tokens/s under load). rayon's workers park
//! after a short spin, so a busy core costs a share of throughput, not all of it.

/// Runs data-parallel loops over at most `n_threads` threads. With one thread every loop runs
/// inline on the caller, with no pool and no synchronisation at all.
pub struct ComputePool {
    n_threads: usize,
    pool: Option<rayon::ThreadPool>,
}

impl ComputePool {
    /// A pool of `n_threads` threads (at least 1).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let pool = if n_threads > 1 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n_threads)
                .thread_name(|i| format!("potluck-compute-{i}"))
                .build()
                .ok()
        } else {
            None
        };
        // If the pool could not be built we still compute, on the caller's thread.
        let n_threads = if pool.is_some() { n_threads } else { 1 };
        Self { n_threads, pool }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Calls `f(chunk_index, chunk)` for consecutive chunks of `out`, each `chunk_len` long
    /// (the last may be shorter), spread over the pool's threads.
    pub fn for_each_chunk<T, F>(&self, out: &mut [T], chunk_len: usize, f: F)
    where
        T: Send,
        F: Fn(usize, &mut [T]) + Send + Sync,
    {
        assert!(chunk_len > 0, "chunk_len must be positive");
        match &self.pool {
            None => {
                for (i, chunk) in out.chunks_mut(chunk_len).enumerate() {
                    f(i, chunk);
                }
            }
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| {
                    out.par_chunks_mut(chunk_len)
                        .enumerate()
                        .for_each(|(i, chunk)| f(i, chunk));
                });
            }
        }
    }

    /// Runs `f` on one of the pool's threads, so that the data-parallel loops inside it start
    /// on a pool thread: each loop is then split by work stealing among threads already in
    /// the pool, instead of being injected from outside with the caller asleep until it ends
    /// (two cross-thread wake-ups per loop, and a forward step has about eight loops per
    /// layer). With one thread, `f` runs inline.
    pub fn run<R, F>(&self, f: F) -> R
    where
        R: Send,
        F: FnOnce() -> R + Send,
    {
        match &self.pool {
            None => f(),
            Some(pool) => pool.install(f),
        }
    }

    /// Runs `f(i)` for `i in 0..n` over the pool's threads.
    pub fn for_each_index<F>(&self, n: usize, f: F)
    where
        F: Fn(usize) + Send + Sync,
    {
        match &self.pool {
            None => (0..n).for_each(f),
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| (0..n).into_par_iter().for_each(f));
            }
        }
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool").field("n_threads", &self.n_threads).finish()
    }
}
