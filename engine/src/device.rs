//! The device this process computes on, measured: how much memory it may fill, how fast that
//! memory streams, and how fast the engine's own quantized kernels run on it.
//!
//! A worker measures itself when it joins (and `worker bench` prints the result) so that the
//! shard planner works from numbers of this machine, today, under its current load, rather than
//! from a spec sheet. [`DeviceProfile::measure`] takes about a second:
//!
//! 1. **Memory.** Linux: `/proc/meminfo`'s `MemTotal` and `MemAvailable` (the kernel's own
//!    estimate of what can be allocated without swapping, page cache included). The budget is
//!    available memory less a reserve for the OS and the user's other programs
//!    (max([`MEMORY_RESERVE_BYTES_MIN`], [`MEMORY_RESERVE_PERCENT`] % of total)), capped by
//!    `--memory-limit`. Other systems are not supported yet: [`DeviceError::UnsupportedOs`]
//!    rather than a guess, because a budget that is too large gets a process killed mid-model.
//! 2. **Memory bandwidth.** A streaming read of a buffer much larger than the last-level cache
//!    ([`STREAM_BYTES_MAX`], at most 1/[`STREAM_AVAILABLE_DIVISOR`] of available memory) on
//!    the [`ComputePool`]'s threads.
//! 3. **Quantized matmul.** The engine's [`QMatrix`] over random Q4_1 blocks: a single-row
//!    matvec over that same buffer (decode: weight bytes read per second, memory-bound), the
//!    same matvec over a matrix that stays in cache (compute only: what the planner's
//!    `matmul_flops_per_s` means, see docs/planner.md), and a [`PREFILL_ROWS`]-row matmul
//!    (prefill FLOP/s, compute-bound).
//!
//! Each phase keeps the best of a few short runs ([`RUNS_MIN`]..=[`RUNS_MAX`], within its share
//! of the time budget): on a machine busy with other work the best run is the closest to what
//! the device can do, and a single run is at the mercy of one context switch.
//!
//! [`DeviceProfile::measure_backend`] is the one measure; only the CPU backend exists today.
//! A GPU backend (wgpu, see the GPU issue) adds its arm there and measures its memory and
//! its own kernels the same way.

use crate::error::EngineError;
use crate::quant::{GgmlDType, Isa, QMatrix};
use crate::threads::ComputePool;
use half::f16;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Time budget of the benchmarks when the caller has no reason to pick another: long enough for
/// several runs of each phase, short enough not to be noticed at `worker join`.
pub const MEASURE_TIME_DEFAULT_MS: u64 = 1000;
/// The least memory left to the OS and the user's programs (desktop, browser): below about
/// 1 GiB free a desktop starts swapping or the OOM killer picks a victim.
pub const MEMORY_RESERVE_BYTES_MIN: u64 = GIB;
/// On larger machines the reserve grows with total memory: what the rest of the machine uses
/// grows with it.
pub const MEMORY_RESERVE_PERCENT: u64 = 10;
/// The streaming buffer (and the decode matrix, which reuses it): 8× a 32 MiB L3 and 2.5× the
/// largest desktop L3s (96 MiB), so the reads come from memory, not cache.
pub const STREAM_BYTES_MAX: u64 = 256 * MIB;
/// The streaming buffer takes at most this fraction (1/n) of available memory, so measuring
/// never pushes a machine that is short of memory into swap.
pub const STREAM_AVAILABLE_DIVISOR: u64 = 8;
/// …but never less than this, or a small machine would measure its cache.
pub const STREAM_BYTES_MIN: u64 = 32 * MIB;
/// Inner dimension of every benchmark matrix: a common hidden size (Llama-3-8B, Qwen2.5-7B).
pub const BENCH_N_IN: usize = 4096;
/// Activation rows of the prefill benchmark: one chunk of a prompt, enough for the kernels to
/// reuse every unpacked weight block across full tiles.
pub const PREFILL_ROWS: usize = 64;
/// Output rows of the prefill matrix (2.5 MiB of Q4_1 at [`BENCH_N_IN`]): it stays in cache,
/// and one run is 0.5 GFLOP, a few ms on a laptop and under a second on the slowest boards.
pub const PREFILL_N_OUT: usize = 1024;
/// Weight bytes per thread of the in-cache decode matrix: fits the L2 of any recent core.
pub const CACHED_MATRIX_BYTES_PER_THREAD: u64 = 512 * KIB;
/// The in-cache matrix never grows past this whatever the thread count (it must stay in cache,
/// and `--threads` is not a reason to allocate without bound).
pub const CACHED_MATRIX_BYTES_MAX: u64 = 16 * MIB;
/// Matvecs per timed run of the in-cache benchmark: one is tens of µs, too short to time alone.
pub const CACHED_CALLS_PER_RUN: usize = 32;
/// Every phase runs at least this often (so that "best of" means something) …
pub const RUNS_MIN: usize = 2;
/// … and at most this often, however fast the machine.
pub const RUNS_MAX: usize = 16;
/// Shares of the time budget, in percent, for streaming read, decode from memory, decode in
/// cache and prefill. The memory-bound phases get more: their runs are longer and noisier.
const PHASE_PERCENT: [u32; 4] = [20, 35, 20, 25];
const _: () =
    assert!(PHASE_PERCENT[0] + PHASE_PERCENT[1] + PHASE_PERCENT[2] + PHASE_PERCENT[3] == 100);
const _: () = assert!(RUNS_MIN >= 1 && RUNS_MIN <= RUNS_MAX);
const _: () = assert!(STREAM_BYTES_MIN <= STREAM_BYTES_MAX);
const _: () = assert!(CACHED_MATRIX_BYTES_PER_THREAD <= CACHED_MATRIX_BYTES_MAX);

/// Q4_1: `block_q4_1 { f16 d; f16 m; u8 qs[16]; }` for 32 values (ggml-common.h).
const Q4_1_BLOCK_BYTES: usize = 20;
const Q4_1_BLOCK_VALUES: usize = 32;
/// FLOPs per weight byte of a Q4_1 matvec: a multiply and an add per value.
const Q4_1_FLOPS_PER_BYTE: f64 = 2.0 * Q4_1_BLOCK_VALUES as f64 / Q4_1_BLOCK_BYTES as f64;

/// Where the matmuls run: the engine's [`BackendKind`]. Serialised as `"cpu"`; new
/// backends are new variants, so every conversion (the worker's into the planner's node)
/// must handle them.
pub use crate::backend::BackendKind as DeviceBackend;

/// One device, measured. Rates are best-of-runs; see the module docs for what each run does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub backend: DeviceBackend,
    /// As the OS names it (`/proc/cpuinfo`'s `model name`), when it does.
    pub cpu_model: Option<String>,
    /// The kernel family the engine picked on this CPU (`avx512-vnni`, `avx2`, `scalar`).
    pub kernels: String,
    /// Compute threads the benchmarks ran on (the pool the engine will use).
    pub threads: usize,
    pub total_memory_bytes: u64,
    /// What the OS says can be allocated without swapping (Linux `MemAvailable`).
    pub available_memory_bytes: u64,
    /// Left to the OS and other programs: max(1 GiB, 10% of total).
    pub memory_reserve_bytes: u64,
    /// What this node may fill with weights and KV cache: available − reserve, capped by the
    /// caller's memory limit.
    pub memory_budget_bytes: u64,
    /// Streaming read bandwidth over a buffer far larger than the caches.
    pub memory_bandwidth_bytes_per_s: f64,
    /// Q4_1 single-row matvec over a matrix far larger than the caches: weight bytes read per
    /// second. What one decode step of a Q4 model costs per byte of its layers.
    pub qmatmul_decode_bytes_per_s: f64,
    /// The same matvec over a matrix that stays in cache: compute only, in FLOP/s (2 per
    /// weight). The planner's `matmul_flops_per_s`, which it adds to the read time.
    pub qmatmul_decode_cached_flops_per_s: f64,
    /// Q4_1 matmul of [`PREFILL_ROWS`] activation rows, in FLOP/s: prompt processing speed.
    pub qmatmul_prefill_flops_per_s: f64,
    /// Wall time of the whole measurement, buffers included.
    pub measured_ms: u64,
}

/// Why a device could not be measured.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("cannot understand /proc/meminfo: {0}")]
    BadMeminfo(String),
    #[error(
        "cannot tell how much memory is free on {0}: only Linux (/proc/meminfo) is supported so far"
    )]
    UnsupportedOs(&'static str),
    #[error("cannot allocate {bytes} bytes for the benchmark buffers")]
    OutOfMemory { bytes: u64 },
    #[error("benchmark matrix: {0}")]
    Matrix(#[from] EngineError),
}

/// Why a size such as `--memory-limit 4GiB` was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseSizeError {
    #[error("empty size (expected e.g. 4GiB, 512MiB, 2G or 1500000000)")]
    Empty,
    #[error("`{0}` does not start with a number (expected e.g. 4GiB, 512MiB, 2G)")]
    BadNumber(String),
    #[error("unknown unit `{0}` (use B, K/KB, M/MB, G/GB, T/TB for powers of 1000, KiB, MiB, GiB, TiB for powers of 1024)")]
    UnknownUnit(String),
    #[error("a size of zero is no use as a limit")]
    Zero,
    #[error("`{0}` is larger than 2^64 bytes")]
    TooLarge(String),
}

/// Parses a byte size: an integer or decimal number, then an optional unit. `K`, `M`, `G`, `T`
/// (with or without `B`) are powers of 1000 and `KiB`, `MiB`, `GiB`, `TiB` (or `Ki` …) powers
/// of 1024, as in Kubernetes and SI; units are case-insensitive and may follow a space.
/// Fractions round down to a whole byte. Zero is rejected: no use for a limit of nothing.
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_end);
    let unit = unit.trim_start();
    let bad_number = || ParseSizeError::BadNumber(text.to_string());
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(fraction) {
        // "", ".5", "1.2.3" (the second dot lands in `fraction`).
        return Err(bad_number());
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(ParseSizeError::UnknownUnit(unit.to_string())),
    };
    let too_large = || ParseSizeError::TooLarge(text.to_string());
    // Longer numbers are far past 2^64 bytes; this keeps the parse within u128.
    const DIGITS_MAX: usize = 30;
    if whole.len() > DIGITS_MAX {
        return Err(too_large());
    }
    let whole: u128 = whole.parse().map_err(|_| bad_number())?;
    // Digits past the 12th cannot change the byte count (the largest multiplier is < 10^13).
    let fraction = &fraction[..fraction.len().min(12)];
    let fraction_bytes = if fraction.is_empty() {
        0
    } else {
        let numerator: u128 = fraction.parse().map_err(|_| bad_number())?;
        numerator * multiplier / 10u128.pow(fraction.len() as u32)
    };
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|b| b.checked_add(fraction_bytes))
        .ok_or_else(too_large)?;
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err(ParseSizeError::Zero);
    }
    Ok(bytes)
}

/// The two lines of `/proc/meminfo` the budget needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    /// `MemAvailable`; on kernels before 3.14, which lack it, `MemFree` (which leaves out the
    /// reclaimable page cache: too low, never too high). At most `total_bytes`.
    pub available_bytes: u64,
}

/// Parses `/proc/meminfo` (`Key:   12345 kB` lines; the kernel's "kB" is KiB).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, DeviceError> {
    let field = |key: &str| -> Result<Option<u64>, DeviceError> {
        let Some(rest) = text.lines().find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            (name.trim() == key).then_some(rest)
        }) else {
            return Ok(None);
        };
        let bad = || DeviceError::BadMeminfo(format!("{key}:{rest}"));
        let mut words = rest.split_whitespace();
        let value: u64 = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let scale = match words.next() {
            None => 1,
            Some("kB") => KIB,
            Some(_) => return Err(bad()),
        };
        value.checked_mul(scale).map(Some).ok_or_else(bad)
    };
    let total_bytes =
        field("MemTotal")?.ok_or_else(|| DeviceError::BadMeminfo("no MemTotal line".into()))?;
    let available_bytes = match field("MemAvailable")? {
        Some(available) => available,
        None => field("MemFree")?
            .ok_or_else(|| DeviceError::BadMeminfo("neither MemAvailable nor MemFree".into()))?,
    };
    Ok(MemInfo {
        total_bytes,
        available_bytes: available_bytes.min(total_bytes),
    })
}

/// The memory left to the rest of the machine: max(1 GiB, 10% of total).
pub fn memory_reserve_bytes(total_bytes: u64) -> u64 {
    let share = u128::from(total_bytes) * u128::from(MEMORY_RESERVE_PERCENT) / 100;
    // At most total_bytes, so it fits in u64.
    MEMORY_RESERVE_BYTES_MIN.max(share as u64)
}

/// What this node may fill: available less the reserve, capped by the caller's limit.
pub fn memory_budget_bytes(memory: MemInfo, memory_limit_bytes: Option<u64>) -> u64 {
    let free = memory
        .available_bytes
        .saturating_sub(memory_reserve_bytes(memory.total_bytes));
    memory_limit_bytes.map_or(free, |limit| free.min(limit))
}

/// The CPU's name in `/proc/cpuinfo`: `model name` on x86, `Model` on a Raspberry Pi.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    ["model name", "Model"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            (name.trim() == *key && !value.is_empty()).then(|| value.to_string())
        })
    })
}

/// This machine's memory budget (available memory less the reserve, capped by
/// `memory_limit_bytes`), read without running the benchmarks: what a server that computes
/// alone needs to decide whether a model fits before it loads a byte of it.
pub fn measure_memory_budget_bytes(memory_limit_bytes: Option<u64>) -> Result<u64, DeviceError> {
    Ok(memory_budget_bytes(read_memory()?, memory_limit_bytes))
}

#[cfg(target_os = "linux")]
fn read_memory() -> Result<MemInfo, DeviceError> {
    const PATH: &str = "/proc/meminfo";
    let text =
        std::fs::read_to_string(PATH).map_err(|source| DeviceError::Read { path: PATH, source })?;
    parse_meminfo(&text)
}

#[cfg(not(target_os = "linux"))]
fn read_memory() -> Result<MemInfo, DeviceError> {
    Err(DeviceError::UnsupportedOs(std::env::consts::OS))
}

/// The CPU's name, if the OS says it (optional: only shown to people).
fn read_cpu_model() -> Option<String> {
    if cfg!(target_os = "linux") {
        parse_cpu_model(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
    } else {
        None
    }
}

fn kernels_name(isa: Isa) -> &'static str {
    match isa {
        Isa::Scalar => "scalar",
        Isa::Avx2 => "avx2",
        Isa::Avx512Vnni => "avx512-vnni",
    }
}

/// Buffer sizes of one measurement (smaller in tests).
#[derive(Debug, Clone, Copy)]
struct BenchSizes {
    stream_bytes: u64,
    cached_matrix_bytes: u64,
    prefill_n_out: usize,
}

impl BenchSizes {
    fn for_device(available_bytes: u64, threads: usize) -> Self {
        let stream_bytes =
            (available_bytes / STREAM_AVAILABLE_DIVISOR).clamp(STREAM_BYTES_MIN, STREAM_BYTES_MAX);
        let cached_matrix_bytes = CACHED_MATRIX_BYTES_PER_THREAD
            .saturating_mul(threads as u64)
            .min(CACHED_MATRIX_BYTES_MAX);
        Self {
            stream_bytes,
            cached_matrix_bytes,
            prefill_n_out: PREFILL_N_OUT,
        }
    }
}

/// The benchmark rates of one measurement.
#[derive(Debug, Clone, Copy)]
struct Rates {
    bandwidth_bytes_per_s: f64,
    decode_bytes_per_s: f64,
    decode_cached_flops_per_s: f64,
    prefill_flops_per_s: f64,
}

impl DeviceProfile {
    /// Measures this machine's CPU with `threads` compute threads, within about `time_budget`
    /// (plus the time to fill the buffers, ~0.1 s; every phase runs at least [`RUNS_MIN`]
    /// times, so a very slow machine takes longer). `memory_limit_bytes` caps the budget.
    ///
    /// Allocates up to [`STREAM_BYTES_MAX`] for the duration of the call.
    pub fn measure(
        threads: usize,
        memory_limit_bytes: Option<u64>,
        time_budget: Duration,
    ) -> Result<DeviceProfile, DeviceError> {
        Self::measure_backend(&crate::backend::Backend::cpu(threads), memory_limit_bytes, time_budget)
    }

    /// The one device measure behind `worker bench` and a worker's join: what `backend`
    /// can hold and how fast it runs the engine's kernels. Each backend extends it with its
    /// own arm (a GPU measures its memory and its own kernels the same way).
    pub fn measure_backend(
        backend: &crate::backend::Backend,
        memory_limit_bytes: Option<u64>,
        time_budget: Duration,
    ) -> Result<DeviceProfile, DeviceError> {
        match backend.kind() {
            DeviceBackend::Cpu => Self::measure_cpu(backend.pool(), memory_limit_bytes, time_budget),
        }
    }

    fn measure_cpu(pool: &ComputePool, memory_limit_bytes: Option<u64>, time_budget: Duration) -> Result<DeviceProfile, DeviceError> {
        let started = Instant::now();
        let memory = read_memory()?;
        let sizes = BenchSizes::for_device(memory.available_bytes, pool.n_threads());
        let rates = run_benchmarks(pool, sizes, time_budget)?;
        let profile = DeviceProfile {
            backend: DeviceBackend::Cpu,
            cpu_model: read_cpu_model(),
            kernels: kernels_name(Isa::detect()).to_string(),
            threads: pool.n_threads(),
            total_memory_bytes: memory.total_bytes,
            available_memory_bytes: memory.available_bytes,
            memory_reserve_bytes: memory_reserve_bytes(memory.total_bytes),
            memory_budget_bytes: memory_budget_bytes(memory, memory_limit_bytes),
            memory_bandwidth_bytes_per_s: rates.bandwidth_bytes_per_s,
            qmatmul_decode_bytes_per_s: rates.decode_bytes_per_s,
            qmatmul_decode_cached_flops_per_s: rates.decode_cached_flops_per_s,
            qmatmul_prefill_flops_per_s: rates.prefill_flops_per_s,
            measured_ms: started.elapsed().as_millis() as u64,
        };
        Ok(profile)
    }
}

fn run_benchmarks(
    pool: &ComputePool,
    sizes: BenchSizes,
    time_budget: Duration,
) -> Result<Rates, DeviceError> {
    let phase_time = |phase: usize| time_budget * PHASE_PERCENT[phase] / 100;
    let mut x = vec![0f32; PREFILL_ROWS * BENCH_N_IN];
    fill_activations(&mut x, 0x5eed);
    let x_row = &x[..BENCH_N_IN];

    // One buffer serves the streaming read and, filled with valid Q4_1 blocks, the decode
    // matrix: one allocation and one pass of page faults instead of two.
    let row_bytes = BENCH_N_IN / Q4_1_BLOCK_VALUES * Q4_1_BLOCK_BYTES;
    let stream_n_out = (sizes.stream_bytes as usize / row_bytes).max(1);
    let stream = q4_1_bytes(stream_n_out * row_bytes, pool)?;

    let bandwidth_bytes_per_s = best_rate(phase_time(0), || {
        std::hint::black_box(stream_read(&stream, pool));
        stream.len() as f64
    });

    let decode = QMatrix::new(GgmlDType::Q4_1, stream_n_out, BENCH_N_IN, stream)?;
    let mut out = vec![0f32; stream_n_out];
    let decode_bytes_per_s = best_rate(phase_time(1), || {
        decode.matmul(x_row, 1, &mut out, pool);
        std::hint::black_box(&out);
        decode.size_in_bytes() as f64
    });
    drop(decode);

    let cached_n_out = (sizes.cached_matrix_bytes as usize / row_bytes).max(1);
    let cached = QMatrix::new(
        GgmlDType::Q4_1,
        cached_n_out,
        BENCH_N_IN,
        q4_1_bytes(cached_n_out * row_bytes, pool)?,
    )?;
    let mut out = vec![0f32; cached_n_out];
    let decode_cached_flops_per_s = best_rate(phase_time(2), || {
        for _ in 0..CACHED_CALLS_PER_RUN {
            cached.matmul(x_row, 1, &mut out, pool);
            std::hint::black_box(&out);
        }
        CACHED_CALLS_PER_RUN as f64 * cached.size_in_bytes() as f64 * Q4_1_FLOPS_PER_BYTE
    });

    let prefill_n_out = sizes.prefill_n_out;
    let prefill = QMatrix::new(
        GgmlDType::Q4_1,
        prefill_n_out,
        BENCH_N_IN,
        q4_1_bytes(prefill_n_out * row_bytes, pool)?,
    )?;
    let mut out = vec![0f32; PREFILL_ROWS * prefill_n_out];
    let prefill_flops_per_s = best_rate(phase_time(3), || {
        prefill.matmul(&x, PREFILL_ROWS, &mut out, pool);
        std::hint::black_box(&out);
        2.0 * (PREFILL_ROWS * prefill_n_out * BENCH_N_IN) as f64
    });

    Ok(Rates {
        bandwidth_bytes_per_s,
        decode_bytes_per_s,
        decode_cached_flops_per_s,
        prefill_flops_per_s,
    })
}

/// The best rate (work returned by `run` per second) of [`RUNS_MIN`]..=[`RUNS_MAX`] runs,
/// stopping once `phase_time` has passed.
fn best_rate(phase_time: Duration, mut run: impl FnMut() -> f64) -> f64 {
    let phase_start = Instant::now();
    let mut best: f64 = 0.0;
    for runs in 1..=RUNS_MAX {
        let start = Instant::now();
        let work = run();
        // A run never takes 0 ns, but a coarse clock could say so.
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        best = best.max(work / seconds);
        if runs >= RUNS_MIN && phase_start.elapsed() >= phase_time {
            break;
        }
    }
    best
}

/// A buffer of `len` bytes (a multiple of 20) of random but valid Q4_1 blocks, filled by the
/// pool's threads. Allocation failure is an error, not an abort.
fn q4_1_bytes(len: usize, pool: &ComputePool) -> Result<Vec<u8>, DeviceError> {
    debug_assert!(len.is_multiple_of(Q4_1_BLOCK_BYTES));
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|_| DeviceError::OutOfMemory { bytes: len as u64 })?;
    bytes.resize(len, 0);
    /// Blocks per fill task (1 MiB): enough to amortise a task, small enough to spread.
    const FILL_TASK_BLOCKS: usize = 52_428;
    pool.for_each_chunk(
        &mut bytes,
        FILL_TASK_BLOCKS * Q4_1_BLOCK_BYTES,
        |i, chunk| fill_q4_1_blocks(chunk, i as u64),
    );
    Ok(bytes)
}

/// SplitMix64: a fast, well-mixed sequence for filler data (not for anything that must be
/// unpredictable).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills whole Q4_1 blocks with random nibbles, a scale `d` in [0.001, 0.02) and `m = -8d`:
/// weights of a trained layer's magnitude, never NaN or infinite (the kernels take the same
/// time whatever the values, but a NaN would make a mistake here look like a kernel bug).
fn fill_q4_1_blocks(bytes: &mut [u8], seed: u64) {
    let mut state = seed.wrapping_mul(0xd6e8_feb8_6659_fd93);
    for block in bytes.chunks_exact_mut(Q4_1_BLOCK_BYTES) {
        let r = splitmix64(&mut state);
        let d = 0.001 + 0.019 * (r >> 40) as f32 / (1u64 << 24) as f32;
        block[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-8.0 * d).to_le_bytes());
        block[4..12].copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        block[12..20].copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

/// Activations in [-1, 1).
fn fill_activations(x: &mut [f32], seed: u64) {
    let mut state = seed;
    for v in x {
        *v = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
}

/// Reads every byte of `bytes` once on the pool's threads; returns a checksum so the reads
/// cannot be optimised away.
fn stream_read(bytes: &[u8], pool: &ComputePool) -> u64 {
    let n_tasks = pool.n_threads() * crate::quant::TASKS_PER_THREAD;
    let task_bytes = bytes.len().div_ceil(n_tasks).next_multiple_of(64).max(64);
    let n_tasks = bytes.len().div_ceil(task_bytes);
    let checksum = AtomicU64::new(0);
    pool.for_each_index(n_tasks, |i| {
        let end = ((i + 1) * task_bytes).min(bytes.len());
        checksum.fetch_xor(sum_words(&bytes[i * task_bytes..end]), Ordering::Relaxed);
    });
    checksum.into_inner()
}

/// Wrapping sum of the 8-byte words of `bytes` (a trailing partial word is ignored), with
/// eight independent accumulators so the adds never wait on each other: the loop is limited
/// by the loads, which is what it measures.
fn sum_words(bytes: &[u8]) -> u64 {
    let (lines, _) = bytes.as_chunks::<64>();
    let mut accumulators = [0u64; 8];
    for line in lines {
        let (words, _) = line.as_chunks::<8>();
        for (accumulator, word) in accumulators.iter_mut().zip(words) {
            *accumulator = accumulator.wrapping_add(u64::from_ne_bytes(*word));
        }
    }
    let tail = &bytes[lines.len() * 64..];
    let (words, _) = tail.as_chunks::<8>();
    let tail_sum = words.iter().fold(0u64, |sum, word| {
        sum.wrapping_add(u64::from_ne_bytes(*word))
    });
    accumulators
        .iter()
        .fold(tail_sum, |sum, &accumulator| sum.wrapping_add(accumulator))
}

/// `1536 MiB`-style sizes for people (binary units, as memory is sold and reported).
fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (unit, size) in UNITS {
        if bytes >= size {
            return format!("{:.2} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

impl fmt::Display for DeviceProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpu = self.cpu_model.as_deref().unwrap_or("unknown CPU");
        writeln!(
            f,
            "device           {} ({cpu}), {} threads, {} kernels",
            self.backend.as_str(),
            self.threads,
            self.kernels
        )?;
        writeln!(
            f,
            "memory           {} total, {} available, {} reserved",
            format_bytes(self.total_memory_bytes),
            format_bytes(self.available_memory_bytes),
            format_bytes(self.memory_reserve_bytes)
        )?;
        writeln!(
            f,
            "memory budget    {}",
            format_bytes(self.memory_budget_bytes)
        )?;
        writeln!(
            f,
            "memory bandwidth {:>8.1} GB/s   streaming read",
            self.memory_bandwidth_bytes_per_s / 1e9
        )?;
        writeln!(
            f,
            "Q4_1 decode      {:>8.1} GB/s   single-row matvec, weights from memory",
            self.qmatmul_decode_bytes_per_s / 1e9
        )?;
        writeln!(
            f,
            "Q4_1 decode      {:>8.1} GFLOP/s single-row matvec, weights in cache",
            self.qmatmul_decode_cached_flops_per_s / 1e9
        )?;
        writeln!(
            f,
            "Q4_1 prefill     {:>8.1} GFLOP/s {PREFILL_ROWS} rows",
            self.qmatmul_prefill_flops_per_s / 1e9
        )?;
        writeln!(f, "measured in      {} ms", self.measured_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_units() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1500000000"), Ok(1_500_000_000));
        assert_eq!(parse_size("1500000000B"), Ok(1_500_000_000));
        assert_eq!(parse_size("64k"), Ok(64_000));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("3Mi"), Ok(3 << 20));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("2T"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("4gib"), Ok(4 << 30));
        assert_eq!(parse_size(" 8 GiB "), Ok(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(500));
        assert_eq!(parse_size("1."), Ok(1));
        // Fractions of a byte round down.
        assert_eq!(parse_size("1.9"), Ok(1));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn parse_size_rejects_garbage() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert_eq!(parse_size("   "), Err(ParseSizeError::Empty));
        assert!(matches!(
            parse_size("GiB"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(
            parse_size("-1G"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(
            parse_size(".5G"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(
            parse_size("1.2.3G"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(parse_size("4XB"), Err(ParseSizeError::UnknownUnit(u)) if u == "XB"));
        assert!(matches!(
            parse_size("4 GiB x"),
            Err(ParseSizeError::UnknownUnit(_))
        ));
        assert!(matches!(
            parse_size("1e9"),
            Err(ParseSizeError::UnknownUnit(_))
        ));
        assert!(matches!(
            parse_size("4GiBB"),
            Err(ParseSizeError::UnknownUnit(_))
        ));
        assert_eq!(parse_size("0"), Err(ParseSizeError::Zero));
        assert_eq!(parse_size("0GiB"), Err(ParseSizeError::Zero));
        assert_eq!(parse_size("0.1"), Err(ParseSizeError::Zero));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(ParseSizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("16777216TiB"),
            Err(ParseSizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999999"),
            Err(ParseSizeError::TooLarge(_))
        ));
    }

    const MEMINFO: &str = "\
MemTotal:       24684028 kB
MemFree:        18794640 kB
MemAvailable:   23499640 kB
Buffers:          141232 kB
Cached:          4738384 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_reads_total_and_available() {
        let memory = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(memory.total_bytes, 24_684_028 * 1024);
        assert_eq!(memory.available_bytes, 23_499_640 * 1024);
    }

    #[test]
    fn meminfo_without_available_falls_back_to_free() {
        let old_kernel = MEMINFO.replace("MemAvailable:   23499640 kB\n", "");
        let memory = parse_meminfo(&old_kernel).unwrap();
        assert_eq!(memory.available_bytes, 18_794_640 * 1024);
    }

    #[test]
    fn meminfo_caps_available_at_total() {
        let memory = parse_meminfo("MemTotal: 100 kB\nMemAvailable: 200 kB\n").unwrap();
        assert_eq!(memory.available_bytes, 100 * 1024);
    }

    #[test]
    fn meminfo_rejects_missing_or_bad_lines() {
        for text in [
            "",
            "MemAvailable: 100 kB\n",
            "MemTotal: 100 kB\n",
            "MemTotal: lots kB\nMemAvailable: 1 kB\n",
            "MemTotal: 100 MB\nMemAvailable: 1 kB\n",
            "MemTotal:\nMemAvailable: 1 kB\n",
            "MemTotal: 18446744073709551615 kB\nMemAvailable: 1 kB\n",
        ] {
            assert!(
                matches!(parse_meminfo(text), Err(DeviceError::BadMeminfo(_))),
                "{text:?} should be rejected"
            );
        }
    }

    #[test]
    fn budget_is_available_less_reserve_capped_by_limit() {
        let memory = MemInfo {
            total_bytes: 32 * GIB,
            available_bytes: 20 * GIB,
        };
        // 10% of 32 GiB is more than the 1 GiB floor.
        assert_eq!(memory_reserve_bytes(memory.total_bytes), 32 * GIB / 10);
        assert_eq!(memory_budget_bytes(memory, None), 20 * GIB - 32 * GIB / 10);
        assert_eq!(memory_budget_bytes(memory, Some(4 * GIB)), 4 * GIB);
        assert_eq!(
            memory_budget_bytes(memory, Some(100 * GIB)),
            20 * GIB - 32 * GIB / 10
        );
        // A small machine keeps at least 1 GiB, and a nearly full one has no budget at all.
        let small = MemInfo {
            total_bytes: 4 * GIB,
            available_bytes: 3 * GIB,
        };
        assert_eq!(memory_reserve_bytes(small.total_bytes), GIB);
        assert_eq!(memory_budget_bytes(small, None), 2 * GIB);
        let full = MemInfo {
            total_bytes: 4 * GIB,
            available_bytes: GIB / 2,
        };
        assert_eq!(memory_budget_bytes(full, None), 0);
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9454\n";
        assert_eq!(parse_cpu_model(x86).as_deref(), Some("AMD EPYC 9454"));
        let pi =
            "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n";
        assert_eq!(
            parse_cpu_model(pi).as_deref(),
            Some("Raspberry Pi 5 Model B Rev 1.0")
        );
        assert_eq!(parse_cpu_model("processor : 0\nmodel name :\n"), None);
    }

    #[test]
    fn filler_blocks_are_valid_q4_1() {
        let pool = ComputePool::new(2);
        let (n_out, n_in) = (8, 64);
        let bytes = q4_1_bytes(n_out * n_in / 32 * 20, &pool).unwrap();
        let matrix = QMatrix::new(GgmlDType::Q4_1, n_out, n_in, bytes).unwrap();
        let mut row = vec![0f32; n_in];
        for o in 0..n_out {
            matrix.dequantize_row(o, &mut row);
            // d ∈ [0.001, 0.02), m = -8d, codes 0..=15: weights within ±8d.
            assert!(
                row.iter().all(|w| w.is_finite() && w.abs() <= 0.17),
                "{row:?}"
            );
            assert!(row.iter().any(|&w| w != row[0]), "the nibbles vary");
        }
    }

    #[test]
    fn stream_read_reads_every_word() {
        // Word i holds i + 1: every word read once sums to n (n + 1) / 2.
        let n_words = 10_000usize;
        let bytes: Vec<u8> = (1..=n_words as u64).flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(sum_words(&bytes), (n_words * (n_words + 1) / 2) as u64);
        assert_eq!(
            sum_words(&bytes[..bytes.len() - 3]),
            (n_words * (n_words - 1) / 2) as u64
        );
        // The checksum is the XOR of the per-task sums, tasks split as `stream_read` does.
        for threads in [1, 2] {
            let pool = ComputePool::new(threads);
            let task_bytes = bytes.len().div_ceil(threads * 4).next_multiple_of(64);
            let expected = bytes
                .chunks(task_bytes)
                .fold(0, |checksum, task| checksum ^ sum_words(task));
            assert_eq!(stream_read(&bytes, &pool), expected);
        }
    }

    #[test]
    fn small_benchmarks_give_positive_rates() {
        let pool = ComputePool::new(2);
        let sizes = BenchSizes {
            stream_bytes: 4 * MIB,
            cached_matrix_bytes: 256 * KIB,
            prefill_n_out: 64,
        };
        let rates = run_benchmarks(&pool, sizes, Duration::ZERO).unwrap();
        for rate in [
            rates.bandwidth_bytes_per_s,
            rates.decode_bytes_per_s,
            rates.decode_cached_flops_per_s,
            rates.prefill_flops_per_s,
        ] {
            assert!(rate.is_finite() && rate > 0.0, "{rates:?}");
        }
    }

    #[test]
    fn bench_sizes_follow_available_memory_and_threads() {
        assert_eq!(
            BenchSizes::for_device(64 * GIB, 8).stream_bytes,
            STREAM_BYTES_MAX
        );
        assert_eq!(BenchSizes::for_device(GIB, 8).stream_bytes, GIB / 8);
        assert_eq!(BenchSizes::for_device(0, 8).stream_bytes, STREAM_BYTES_MIN);
        assert_eq!(
            BenchSizes::for_device(GIB, 2).cached_matrix_bytes,
            2 * 512 * KIB
        );
        assert_eq!(
            BenchSizes::for_device(GIB, 100_000).cached_matrix_bytes,
            CACHED_MATRIX_BYTES_MAX
        );
    }

    #[test]
    fn profile_round_trips_through_json() {
        let profile = DeviceProfile {
            backend: DeviceBackend::Cpu,
            cpu_model: Some("Test CPU".into()),
            kernels: "avx2".into(),
            threads: 4,
            total_memory_bytes: 16 * GIB,
            available_memory_bytes: 12 * GIB,
            memory_reserve_bytes: 16 * GIB / 10,
            memory_budget_bytes: 12 * GIB - 16 * GIB / 10,
            memory_bandwidth_bytes_per_s: 40e9,
            qmatmul_decode_bytes_per_s: 30e9,
            qmatmul_decode_cached_flops_per_s: 200e9,
            qmatmul_prefill_flops_per_s: 500e9,
            measured_ms: 1100,
        };
        let json = serde_json::to_value(&profile).unwrap();
        assert_eq!(json["backend"], "cpu");
        assert_eq!(
            serde_json::from_value::<DeviceProfile>(json).unwrap(),
            profile
        );
        let table = profile.to_string();
        assert!(table.contains("memory budget    10.40 GiB"), "{table}");
        assert!(table.contains("40.0 GB/s"), "{table}");
    }
}
