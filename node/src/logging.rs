//! Logging for the `coordinator` and `worker` binaries, set up one way for both.
//!
//! Logs go to stderr, at `info` unless `RUST_LOG` says otherwise, as text or, with
//! `--log-format json` (or `POTLUCK_LOG_FORMAT=json`), one JSON object per line for a log
//! collector (`timestamp`, `level`, `target`, `fields` with the message and every structured
//! field). Colours only in text, only when stderr is a terminal and `NO_COLOR` is unset: a
//! log redirected into a file or collected by a service manager (journald) must not fill
//! with escape codes.

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("the log format is `text` or `json`, not `{other}`")),
        }
    }
}

/// Whether log lines carry ANSI colours: a terminal that did not ask for none.
pub fn use_colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The subscriber both binaries install, writing to `writer`.
fn subscriber<W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().with_ansi(false).finish()),
    }
}

/// Installs the process's log subscriber. Call once, as soon as the command line is read.
pub fn init(format: LogFormat) {
    let ansi = use_colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    // A second call (a test harness that installed its own) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber(format, ansi, std::io::stderr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn colours_only_on_a_terminal_that_did_not_opt_out() {
        assert!(use_colours(true, None));
        assert!(!use_colours(false, None), "a file or a pipe gets no escape codes");
        assert!(!use_colours(true, Some("1".as_ref())), "NO_COLOR=1 turns them off");
        assert!(use_colours(true, Some("".as_ref())), "an empty NO_COLOR is unset (no-color.org)");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_are_json_with_the_structured_fields() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(subscriber(LogFormat::Json, true, buffer.clone()), || {
            tracing::info!(node = "w1", budget_mib = 1200, "worker joined");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "worker joined");
        assert_eq!((line["fields"]["node"].as_str(), line["fields"]["budget_mib"].as_u64()), (Some("w1"), Some(1200)));
        assert!(!text.contains('\u{1b}'), "no escape codes in JSON");
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().unwrap_err().contains("`text` or `json`"));
    }
}
