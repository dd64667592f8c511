//! The signals that end a node's process cleanly: SIGTERM (what systemd and `docker stop`
//! send) and SIGINT (Ctrl-C). Both binaries wait on [`shutdown_signal`], so a service manager
//! stopping a worker is a clean leave (the coordinator re-plans at once, instead of after the
//! silence timeout), and stopping the coordinator drains its open answers.

/// Resolves on SIGTERM or SIGINT (Ctrl-C); on systems without SIGTERM, on Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
