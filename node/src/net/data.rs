//! The data plane's three moves, shared by a worker's stage thread and the coordinator's
//! generation thread: sending to the next node's data endpoint ([`DataLink`]), taking data
//! streams only from members ([`accept_members`]), and reading one such stream
//! ([`DataStream`], which closes only its own connection when the peer breaks the protocol). Both run on the runtime of the one
//! thread that computes (see [`super::tls::Plane::Data`]).

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use potluck_protocol::{close, Message};

use super::framed::{FrameError, FrameReader, FrameWriter};
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
/// opens goes to `on_stream` as a [`DataStream`].
pub async fn accept_members<M, S>(endpoint: quinn::Endpoint, is_member: M, on_stream: S)
where
    M: Fn(&str) -> bool + Clone + Send + 'static,
    S: Fn(DataStream) + Clone + Send + 'static,
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
                    connection.close(close::NO_IDENTITY.into(), b"no identity");
                    return tracing::warn!(error = %e, "refused a data connection without a node identity");
                }
            };
            if !is_member(&peer) {
                tracing::warn!(%peer, remote = %connection.remote_address(), "refused a data connection from a node that is not a member of this pipeline");
                connection.close(close::NOT_A_MEMBER.into(), b"not a member of this pipeline");
                return;
            }
            while let Ok(recv) = connection.accept_uni().await {
                on_stream(DataStream { reader: FrameReader::new(recv), connection: connection.clone(), peer: peer.clone() });
            }
        });
    }
}

/// One member's data stream, read a frame at a time.
pub struct DataStream {
    reader: FrameReader<quinn::RecvStream>,
    connection: quinn::Connection,
    peer: String,
}

impl DataStream {
    /// The node id its TLS certificate proved.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The next message; `Ok(None)` when the peer finished the stream. A frame that breaks
    /// the protocol (garbage, a frame over its limit, a truncated one, a shape that does not
    /// match its payload) closes the peer's connection with [`close::DATA_PROTOCOL_ERROR`] and
    /// the reason logged, and is returned as the error: a bad stream ends only its own
    /// connection, never the stage that reads it.
    pub async fn recv(&mut self) -> Result<Option<Message>, FrameError> {
        let result = self.reader.recv().await;
        if let Err(e) = &result {
            tracing::warn!(peer = %self.peer, remote = %self.connection.remote_address(), error = %e, "bad data stream; closing the connection");
            self.connection.close(close::DATA_PROTOCOL_ERROR.into(), b"protocol error on a data stream");
        }
        result
    }
}
