//! The data plane's two moves, shared by a worker's stage thread and the coordinator's
//! generation thread: sending to the next node's data endpoint ([`DataLink`]), and taking
//! data streams only from members ([`accept_members`]). Both run on the runtime of the one
//! thread that computes (see [`super::tls::Plane::Data`]).

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use potluck_protocol::Message;

use super::framed::FrameWriter;
use super::identity::NodeIdentity;
use super::tls::{self, Plane};

/// A one-way data stream to the node `node_id` at `address`, dialled (its identity checked)
/// on the first send. After a failed send the link is closed and the next send dials again.
pub struct DataLink {
    address: SocketAddr,
    node_id: String,
    writer: Option<FrameWriter<quinn::SendStream>>,
    connection: Option<quinn::Connection>,
}

impl DataLink {
    pub fn new(address: SocketAddr, node_id: String) -> Self {
        Self { address, node_id, writer: None, connection: None }
    }

    /// QUIC's smoothed round-trip estimate of the link, once it has been dialled.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        self.connection.as_ref().map(quinn::Connection::rtt)
    }

    /// Sends `message`, dialling from `endpoint` (a data endpoint) first if needed.
    pub async fn send(&mut self, endpoint: &quinn::Endpoint, identity: &NodeIdentity, message: &Message) -> Result<()> {
        if self.writer.is_none() {
            let connection = tls::connect_on(Plane::Data, endpoint, identity, self.address, Some(&self.node_id))
                .await
                .with_context(|| format!("cannot reach the next stage at {}", self.address))?;
            let send = connection.open_uni().await.context("cannot open the data stream downstream")?;
            self.writer = Some(FrameWriter::new(send));
            self.connection = Some(connection);
        }
        let writer = self.writer.as_mut().expect("opened above");
        if let Err(e) = writer.send(message).await {
            self.writer = None;
            return Err(anyhow!("the data stream to {} failed: {e}", self.address));
        }
        // Let the connection's driver put the frame on the wire now: nothing else drives
        // this runtime until its thread next waits (for input, or for the next request).
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Ends the stream cleanly (the peer reads its end), if one is open.
    pub fn finish(&mut self) {
        if let Some(mut writer) = self.writer.take() {
            let _ = writer.get_mut().finish();
        }
    }
}

/// Accepts connections on a data endpoint. A connection whose TLS-proven node id
/// `is_member` rejects is closed with a logged reason; every unidirectional stream a member
/// opens goes to `on_stream` with its connection and the peer's node id.
pub async fn accept_members<M, S>(endpoint: quinn::Endpoint, is_member: M, on_stream: S)
where
    M: Fn(&str) -> bool + Clone + Send + 'static,
    S: Fn(quinn::RecvStream, quinn::Connection, String) + Clone + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let (is_member, on_stream) = (is_member.clone(), on_stream.clone());
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(c) => c,
                Err(e) => return tracing::info!(error = %e, "a data connection failed its handshake"),
            };
            let peer = match tls::peer_node_id(&connection) {
                Ok(p) => p,
                Err(e) => {
                    connection.close(2u32.into(), b"no identity");
                    return tracing::warn!(error = %e, "refused a data connection without a node identity");
                }
            };
            if !is_member(&peer) {
                tracing::warn!(%peer, remote = %connection.remote_address(), "refused a data connection from a node that is not a member of this pipeline");
                connection.close(3u32.into(), b"not a member of this pipeline");
                return;
            }
            while let Ok(recv) = connection.accept_uni().await {
                on_stream(recv, connection.clone(), peer.clone());
            }
        });
    }
}
