//! This process's resident memory, as the operating system counts it: what a node really
//! holds, shown beside its budget and its plan (the heartbeat carries a worker's; the
//! coordinator reads its own). Linux only today (`/proc/self/status`); elsewhere the figures
//! are unknown (`None`, sent as 0) rather than guessed.

/// Resident memory now and at its peak since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resident {
    /// `VmRSS`: pages in memory now.
    pub now_bytes: u64,
    /// `VmHWM`: the most that were, ever — the figure a memory limit must bound, since a
    /// sample can miss a short peak (loading a tensor, measuring the device).
    pub peak_bytes: u64,
}

/// This process's [`Resident`] figures, or `None` where the system does not give them.
pub fn resident() -> Option<Resident> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// Reads `VmRSS` and `VmHWM` (kB) out of a `/proc/PID/status` text.
fn parse_status(status: &str) -> Option<Resident> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some(Resident { now_bytes: field("VmRSS:")?, peak_bytes: field("VmHWM:")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_fields() {
        let status = "Name:\tworker\nVmPeak:\t 900 kB\nVmHWM:\t   204800 kB\nVmRSS:\t   102400 kB\nThreads:\t4\n";
        assert_eq!(parse_status(status), Some(Resident { now_bytes: 100 << 20, peak_bytes: 200 << 20 }));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size_and_its_peak_bounds_it() {
        let r = resident().expect("/proc/self/status");
        assert!(r.now_bytes > 0 && r.peak_bytes >= r.now_bytes, "{r:?}");
    }
}
