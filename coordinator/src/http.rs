//! The HTTP server's accept loop: what `axum::serve` does, plus what a server reachable by
//! anyone on the LAN needs against clients that hold connections open without finishing a
//! request (slowloris).
//!
//! * **Header-read timeout** ([`HEADER_READ_TIMEOUT_MS`]): a connection that has not sent a
//!   whole request head within it is closed (hyper's HTTP/1 timer). Without it, 1,100
//!   half-open connections held from one client made the API unreachable for as long as they
//!   stayed open (issue 18's measurement).
//! * **Connection cap** ([`connections_max`]): past it a connection gets a 503 with
//!   `Retry-After` and is closed at once, so descriptors never run out under the server's
//!   feet (each QUIC endpoint, model file and log needs one too).
//! * **Descriptor limit** ([`raise_descriptor_limit`]): the soft limit is raised to the hard
//!   one at start (Linux's default soft limit is 1,024, which 1,100 sockets exceed).
//! * **Graceful drain** as `axum::serve`'s: on `shutdown`, stop accepting, let each
//!   connection finish what it is answering, then return.
//!
//! HTTP/1.1 only: OpenAI clients, browsers' `EventSource` and curl all speak it, and an
//! HTTP/2 preface would need its own idle timeout.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// How long a client has to send a whole request head. Clients on a LAN send it in
/// microseconds; ten seconds leaves room for a phone on poor Wi-Fi.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// The most HTTP connections served at once, before the descriptor limit's share.
pub const HTTP_CONNECTIONS_MAX: usize = 4096;

/// Descriptors kept for everything but HTTP connections: QUIC endpoints, the model file,
/// the slice and hash stores, logs, the tokenizer's threads.
pub const DESCRIPTORS_RESERVED: u64 = 256;

/// Wait after a failed accept (out of descriptors, most likely) before the next.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;

/// How long refusing a connection past the cap may take (the 503 written, the client's
/// request read) before the socket is dropped anyway.
const REFUSAL_WRITE_TIMEOUT_MS: u64 = 1_000;

/// Raises this process's soft descriptor limit to its hard limit; returns the soft limit in
/// force afterwards (`None` where it cannot be read).
pub fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap for a soft descriptor limit: [`HTTP_CONNECTIONS_MAX`], less when the
/// limit leaves fewer descriptors than that beside [`DESCRIPTORS_RESERVED`].
pub fn connections_max(descriptor_limit: Option<u64>) -> usize {
    match descriptor_limit {
        Some(limit) => (limit.saturating_sub(DESCRIPTORS_RESERVED) as usize).clamp(16, HTTP_CONNECTIONS_MAX),
        None => HTTP_CONNECTIONS_MAX,
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let cap = connections_max(raise_descriptor_limit());
    let slots = Arc::new(Semaphore::new(cap));
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                    continue;
                }
            },
            _ = signal_tx.closed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, cap));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let (signal_tx, close_rx) = (signal_tx.clone(), close_rx.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS));
            let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
            let mut signalled = pin!(signal_tx.closed().fuse());
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut signalled => connection.as_mut().graceful_shutdown(),
                }
            }
            drop(slot);
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}

/// A clear refusal past the cap: 503, `Retry-After`, an OpenAI-shaped body, then close.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = format!(
        r#"{{"error":{{"message":"this server already holds {cap} connections; try again shortly","type":"server_error","param":null,"code":"too_many_connections"}}}}"#
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Write, end our side, then read what the client sent until it closes: a socket closed
    // with unread bytes sends a reset, and the client would see that instead of the 503.
    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_WRITE_TIMEOUT_MS), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_the_rest() {
        assert_eq!(connections_max(Some(1_048_576)), HTTP_CONNECTIONS_MAX);
        assert_eq!(connections_max(Some(1024)), 1024 - DESCRIPTORS_RESERVED as usize);
        assert_eq!(connections_max(Some(100)), 16, "never below a handful");
        assert_eq!(connections_max(None), HTTP_CONNECTIONS_MAX);
    }
}
