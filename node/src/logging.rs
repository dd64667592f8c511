//! Logging for the `coordinator` and `worker` binaries, set up one way for both.
//!
//! Logs go to stderr, at `info` unless `RUST_LOG` says otherwise. Colours only when stderr is
//! a terminal and `NO_COLOR` is unset: a log redirected into a file or collected by a service
//! manager (journald) must not fill with escape codes.

use std::io::IsTerminal;

/// Whether log lines carry ANSI colours: a terminal that did not ask for none.
pub fn use_colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the process's log subscriber. Call once, first thing in `main`.
pub fn init() {
    let ansi = use_colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

#[cfg(test)]
mod tests {
    use super::use_colours;

    #[test]
    fn colours_only_on_a_terminal_that_did_not_opt_out() {
        assert!(use_colours(true, None));
        assert!(!use_colours(false, None), "a file or a pipe gets no escape codes");
        assert!(!use_colours(true, Some("1".as_ref())), "NO_COLOR=1 turns them off");
        assert!(use_colours(true, Some("".as_ref())), "an empty NO_COLOR is unset (no-color.org)");
    }
}
