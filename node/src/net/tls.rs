//! The QUIC endpoint every node (worker or coordinator) uses to accept and to dial, with
//! certificates bound to the node's identity.
//!
//! What it defends:
//! - **Who is on the other end.** Each side presents a libp2p-tls self-signed certificate
//!   (<https://github.com/libp2p/specs/blob/master/tls/tls.md>) whose extension carries the
//!   node's ed25519 public key and that key's signature over the certificate's key, and the
//!   TLS 1.3 handshake signature proves possession of the certificate's key. So a completed
//!   handshake proves each side's node id ([`peer_node_id`]), without any CA. Authentication
//!   is mutual: the server refuses a client without such a certificate.
//! - **Dialing the wrong machine.** [`connect`] with an expected node id fails the handshake
//!   before we send our own certificate or a single protocol byte unless the server proves
//!   that id, so an address that now belongs to another machine (DHCP, a spoofed mDNS
//!   answer) gets nothing from us.
//! - **Eavesdropping and tampering on the LAN.** Everything after the handshake is TLS 1.3
//!   encrypted and authenticated (QUIC packet protection).
//! - **Other protocols and stray traffic.** The ALPN is [`ALPN`] only (QUIC requires a match,
//!   RFC 9001 §8.1), so a libp2p node or any other QUIC service cannot complete a handshake;
//!   datagrams that are not QUIC v1 create no state (at most a stateless reset, smaller than
//!   the datagram, answers one).
//! - **Stale connections to a restarted node.** Its reset key is derived from its node key,
//!   so its next life ends them at once (see `endpoint_config`).
//! - **Memory a peer can make us hold.** Flow-control windows and stream counts are named
//!   limits below; a peer can never have us buffer more than
//!   [`CONNECTION_RECEIVE_WINDOW_BYTES`] per connection.
//! - **Silent peers.** A control connection without a packet for [`IDLE_TIMEOUT_MS`] is dead;
//!   keep-alives every [`KEEP_ALIVE_MS`] keep a healthy idle connection open.
//!
//! Two planes, two kinds of endpoint ([`Plane`]). Control endpoints run on the process's
//! multi-threaded runtime and carry membership, weights and heartbeats. A **data endpoint**
//! is driven by the one thread that computes a stage (its own current-thread runtime): that
//! thread writes its output and reads its next input straight from the UDP socket, with no
//! hand-off to another thread on the way, which would cost a wake-up per hop per token. While
//! it computes, nothing drives the endpoint, so data connections have no idle timeout and no
//! keep-alives: a peer's liveness is the control plane's business (heartbeats and the control
//! connection's idle timeout), and a pipeline whose stage is gone is replaced as a whole.
//!
//! Not defended here: whether a node may join at all. Any node with a key can complete a
//! handshake; the join token's proofs ([`super::token`]) decide membership.
//!
//! Session resumption and 0-RTT are off: every handshake is a full one with certificates, so
//! identity is always proven by a fresh signature and no early data can be replayed.

use potluck_protocol::close;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context};
use hmac::{Hmac, Mac};
use libp2p_identity::PeerId;
use potluck_protocol::limits::{FRAME_BYTES_MAX, WEIGHT_CHUNK_FRAME_BYTES_MAX};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;

use super::identity::NodeIdentity;

/// The application protocol negotiated in every handshake; a peer offering anything else
/// (a libp2p node speaks `libp2p`) is refused during the handshake. Bump the version when
/// the protocol changes incompatibly in a way the frame header's version cannot express.
pub const ALPN: &[u8] = b"potluck/1";

/// A connection silent this long is dead (both sides close it; the smaller of the two
/// sides' values applies). Matches the membership's 3 s silence timeout, so the transport
/// and the state machine agree on when a node is gone. Also bounds a dial to a silent
/// address: the handshake gives up after this long.
pub const IDLE_TIMEOUT_MS: u64 = 3_000;

/// An idle connection sends a keep-alive (a PING) this often, so a healthy but quiet
/// connection never reaches [`IDLE_TIMEOUT_MS`]; several may be lost before it does.
pub const KEEP_ALIVE_MS: u64 = 500;

/// Longest wait in [`connect`] for the handshake to finish, whatever happens on the wire
/// (the idle timeout usually ends a dial to a silent address first).
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Bytes a peer may send on one stream beyond what we have read: the most one stream can
/// make us buffer. Large enough for a whole weight chunk frame and, on a LAN, far above the
/// bandwidth-delay product, so flow control never throttles a stream we keep reading.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * MIB;

/// Bytes a peer may send on all streams of a connection beyond what we have read: the most
/// one peer can make us buffer.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 * MIB;

/// Bytes we buffer for sending per connection before writes wait.
pub const SEND_WINDOW_BYTES: u32 = 64 * MIB;

/// Bidirectional streams a peer may have open at once (control, data, weight transfers).
pub const CONCURRENT_BIDI_STREAMS_MAX: u32 = 64;

/// Unidirectional streams a peer may have open at once.
pub const CONCURRENT_UNI_STREAMS_MAX: u32 = 64;

/// Connection attempts that may wait to be accepted or refused at once; beyond it quinn
/// refuses new attempts, so a handshake flood cannot grow memory without bound.
pub const PENDING_CONNECTIONS_MAX: usize = 64;

/// The server name our client puts in the handshake. Certificates are checked against node
/// ids, not names, so it only has to be a valid DNS name.
const SERVER_NAME: &str = "potluck";

/// HKDF domain of the stateless-reset key derived from the node's key.
const RESET_KEY_DOMAIN: &[u8] = b"potluck quic stateless reset key";

const MIB: u32 = 1024 * 1024;

// A keep-alive must be able to go missing a few times before the peer declares us dead.
const _: () = assert!(KEEP_ALIVE_MS * 4 <= IDLE_TIMEOUT_MS);
const _: () = assert!(IDLE_TIMEOUT_MS < CONNECT_TIMEOUT_MS);
// A whole weight chunk frame fits one stream's window, so it is never split by flow control
// waiting on the reader.
const _: () = assert!(WEIGHT_CHUNK_FRAME_BYTES_MAX <= STREAM_RECEIVE_WINDOW_BYTES);
// One stream whose reader stalls (a full data stream) cannot take the whole connection
// window: the control stream (heartbeats) always has room.
const _: () = assert!(2 * STREAM_RECEIVE_WINDOW_BYTES <= CONNECTION_RECEIVE_WINDOW_BYTES);
// The largest frame (activations) can be in flight at once on a connection.
const _: () = assert!(FRAME_BYTES_MAX <= CONNECTION_RECEIVE_WINDOW_BYTES);
const _: () = assert!(FRAME_BYTES_MAX <= SEND_WINDOW_BYTES);

/// Installs rustls' ring provider as the process default (idempotent; "already installed"
/// is not an error, and a provider installed earlier by someone else stays).
///
/// libp2p pulls in a second rustls backend, after which rustls' default-provider lookup
/// panics unless one is installed explicitly: call this at the start of every binary and in
/// [`endpoint`]. Our own TLS configs name ring explicitly and do not depend on it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A QUIC endpoint bound to `bind` that both accepts and dials (`bind` port 0: the OS picks;
/// read it back with `local_addr`). Certificates are libp2p-tls self-signed certificates
/// carrying the node's identity, so the handshake proves each side's node id; ALPN is
/// [`ALPN`]; the server requires a client certificate. The transport uses the limits above.
///
/// Must be called inside a tokio runtime (quinn spawns its driver task on it). The endpoint
/// queues incoming connections until `accept` takes them (at most
/// [`PENDING_CONNECTIONS_MAX`]), so a node that listens must keep accepting.
pub fn endpoint(identity: &NodeIdentity, bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    endpoint_for(Plane::Control, identity, bind)
}

/// Which connections an endpoint carries (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Membership, weights, heartbeats: idle timeout and keep-alives.
    Control,
    /// Activations and sampled tokens, driven by a stage's own thread: neither.
    Data,
}

/// [`endpoint`] for `plane`. A data endpoint must be created in (and only ever driven by)
/// the runtime of the thread that will read and write its streams.
pub fn endpoint_for(plane: Plane, identity: &NodeIdentity, bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    install_crypto_provider();
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(anyhow!(
            "the QUIC endpoint must be created inside a tokio runtime"
        ));
    }
    let socket = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("cannot bind the QUIC endpoint to UDP {bind}"))?;
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config(identity),
        Some(server_config(identity, plane)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot start the QUIC endpoint on UDP {bind}"))?;
    // For callers that use `Endpoint::connect` directly: any potluck node is accepted, and
    // `peer_node_id` says which. `connect` below builds its own config per dial.
    let (default_client, _) = client_config(identity, None, plane)?;
    endpoint.set_default_client_config(default_client);
    Ok(endpoint)
}

/// Dials `addr`. With `expected` (a node id), the handshake fails unless the server proves
/// that identity, before we reveal ours. Errors say what happened: nobody answered, the
/// address is another node, or the peer refused us (for instance our certificate or ALPN).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    identity: &NodeIdentity,
    addr: SocketAddr,
    expected: Option<&str>,
) -> anyhow::Result<quinn::Connection> {
    connect_on(Plane::Control, endpoint, identity, addr, expected).await
}

/// [`connect`] from an endpoint of `plane` (the dial's transport settings must match it).
pub async fn connect_on(
    plane: Plane,
    endpoint: &quinn::Endpoint,
    identity: &NodeIdentity,
    addr: SocketAddr,
    expected: Option<&str>,
) -> anyhow::Result<quinn::Connection> {
    let expected_peer = expected
        .map(|id| {
            id.parse::<PeerId>()
                .map_err(|e| anyhow!("{id:?} is not a node id: {e}"))
        })
        .transpose()?;
    let (config, verifier) = client_config(identity, expected_peer, plane)?;
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .with_context(|| format!("cannot dial {addr}"))?;
    let outcome = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting).await;
    let no_answer = |ms: u64| {
        anyhow!(
            "no potluck node answered at {addr} within {} s",
            ms as f64 / 1000.0
        )
    };
    let connection = match outcome {
        Err(_elapsed) => return Err(no_answer(CONNECT_TIMEOUT_MS)),
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            let presented = verifier.presented();
            return Err(match (error, expected_peer, presented) {
                (_, Some(expected), Some(presented)) if expected != presented => {
                    anyhow!("{addr} is node {presented}, expected {expected}")
                }
                (ConnectionError::TimedOut, _, _) => no_answer(IDLE_TIMEOUT_MS),
                (ConnectionError::TransportError(e), _, None) => {
                    anyhow!("{addr} is not a potluck node (its certificate does not prove a node id): {e}")
                }
                (ConnectionError::ConnectionClosed(close), _, _) => {
                    anyhow!("{addr} refused the potluck handshake: {close}")
                }
                (ConnectionError::VersionMismatch, _, _) => {
                    anyhow!("{addr} answered but does not speak QUIC version 1")
                }
                (error, _, _) => {
                    anyhow::Error::new(error).context(format!("connecting to {addr} failed"))
                }
            });
        }
    };
    // Defense in depth: the verifier already refused any other identity.
    let node_id = peer_node_id(&connection)?;
    if let Some(expected) = expected_peer {
        if node_id != expected.to_base58() {
            connection.close(VarInt::from_u32(close::UNEXPECTED_NODE_ID), b"unexpected node id");
            return Err(anyhow!("{addr} is node {node_id}, expected {expected}"));
        }
    }
    Ok(connection)
}

/// The verified node id of the other side of an established connection, from the
/// certificate its handshake proved (checked again here: self-signature and the libp2p
/// extension's signature by the node key).
pub fn peer_node_id(connection: &quinn::Connection) -> anyhow::Result<String> {
    let identity = connection.peer_identity().ok_or_else(|| {
        anyhow!(
            "the connection to {} has no peer certificate",
            connection.remote_address()
        )
    })?;
    let certificates = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow!("the connection's peer identity is not a certificate chain"))?;
    let certificate = certificates.first().ok_or_else(|| {
        anyhow!(
            "the peer at {} presented no certificate",
            connection.remote_address()
        )
    })?;
    let certificate = libp2p_tls::certificate::parse(certificate).with_context(|| {
        format!(
            "the certificate of the peer at {} is not a node certificate",
            connection.remote_address()
        )
    })?;
    Ok(certificate.peer_id().to_base58())
}

/// A fresh per-dial client config: our certificate (libp2p-tls's client config: TLS 1.3
/// only, libp2p's cipher suites, our cert always sent) and a verifier that pins `expected`
/// and records what the server presented, so a mismatch can name both ids.
fn client_config(
    identity: &NodeIdentity,
    expected: Option<PeerId>,
    plane: Plane,
) -> anyhow::Result<(quinn::ClientConfig, Arc<NodeCertVerifier>)> {
    // libp2p-tls's verifier is replaced just below, so its own `remote_peer_id` stays unset.
    let mut crypto = libp2p_tls::make_client_config(identity.keypair(), None)
        .context("cannot make this node's TLS certificate")?;
    let verifier = Arc::new(NodeCertVerifier {
        expected,
        presented: Mutex::new(None),
    });
    crypto
        .dangerous()
        .set_certificate_verifier(verifier.clone());
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.resumption = rustls::client::Resumption::disabled();
    crypto.enable_early_data = false;
    let crypto =
        QuicClientConfig::try_from(crypto).context("the TLS client config cannot carry QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(plane));
    Ok((config, verifier))
}

/// libp2p-tls's server config (TLS 1.3 only, client certificate required and verified as a
/// libp2p certificate) with our ALPN, and no session tickets or resumption.
fn server_config(identity: &NodeIdentity, plane: Plane) -> anyhow::Result<quinn::ServerConfig> {
    let mut crypto = libp2p_tls::make_server_config(identity.keypair())
        .context("cannot make this node's TLS certificate")?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    crypto.send_tls13_tickets = 0;
    crypto.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(crypto).context("the TLS server config cannot carry QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(plane));
    // Nodes on a LAN do not move; without migration a packet with a spoofed source address
    // cannot redirect a connection's traffic.
    config.migration(false);
    config.max_incoming(PENDING_CONNECTIONS_MAX);
    Ok(config)
}

fn transport_config(plane: Plane) -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    match plane {
        Plane::Control => transport
            .max_idle_timeout(Some(
                Duration::from_millis(IDLE_TIMEOUT_MS)
                    .try_into()
                    .expect("IDLE_TIMEOUT_MS fits QUIC's idle timeout (2^62 ms)"),
            ))
            .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS))),
        Plane::Data => transport.max_idle_timeout(None).keep_alive_interval(None),
    };
    transport
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(u64::from(SEND_WINDOW_BYTES))
        .max_concurrent_bidi_streams(VarInt::from_u32(CONCURRENT_BIDI_STREAMS_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(CONCURRENT_UNI_STREAMS_MAX))
        // We use no unreliable datagrams; refusing them is one less buffer a peer can fill.
        .datagram_receive_buffer_size(None);
    Arc::new(transport)
}

/// QUIC v1 only (no drafts), and what lets a restarted node end its previous life's
/// connections at once: a stateless-reset key derived from the node key (as libp2p-quic
/// does) and connection ids that any endpoint of this node treats as possibly its own.
/// A peer still sending on such a connection then gets a valid reset (RFC 9000 §10.3) on its
/// next keep-alive and drops it, instead of waiting out [`IDLE_TIMEOUT_MS`] (during which
/// the coordinator would refuse the restarted worker's id as a duplicate).
fn endpoint_config(identity: &NodeIdentity) -> quinn::EndpointConfig {
    let mut config = match identity.keypair().derive_secret(RESET_KEY_DOMAIN) {
        Some(secret) => quinn::EndpointConfig::new(Arc::new(ResetKey::new(&secret))),
        None => quinn::EndpointConfig::default(),
    };
    config.supported_versions(vec![1]);
    config.cid_generator(|| Box::new(RandomCids));
    config
}

/// Bytes of the connection ids we issue (quinn's default length).
const CONNECTION_ID_BYTES: usize = 8;

/// Random connection ids that every id "validates". quinn's default generator tags its ids
/// with a per-process random key and silently drops packets for ids without its tag, which
/// would keep a restarted process from ever sending the reset above; the price of accepting
/// every id is that a stray short-header datagram may get a reset back, which quinn keeps
/// smaller than the datagram and to one per 20 ms (no amplification). `quinn-proto`'s
/// `HashedConnectionIdGenerator::from_key` would keep the filter too, but quinn does not
/// re-export it.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; CONNECTION_ID_BYTES]>())
    }

    fn cid_len(&self) -> usize {
        CONNECTION_ID_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// HMAC-SHA256 key for quinn's stateless-reset tokens.
struct ResetKey(Hmac<Sha256>);

impl ResetKey {
    fn new(secret: &[u8; 32]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mut mac = self.0.clone();
        mac.update(data);
        signature_out.copy_from_slice(&mac.finalize().into_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// The client's check of the server certificate. It does what libp2p-tls's own verifier
/// does (libp2p-tls 0.6 `verifier.rs`, through the same public `certificate::parse` and
/// `verify_signature`): exactly one certificate, self-signed, valid now, with a libp2p
/// extension signed by the node key; the TLS 1.3 handshake signature made with the
/// certificate's key; and, when `expected` is set, that the node key is the expected one.
/// It also records the node id the server presented, which libp2p's verifier cannot tell
/// us, so a mismatch error can name it.
#[derive(Debug)]
struct NodeCertVerifier {
    expected: Option<PeerId>,
    presented: Mutex<Option<PeerId>>,
}

impl NodeCertVerifier {
    fn presented(&self) -> Option<PeerId> {
        *self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl ServerCertVerifier for NodeCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a potluck node presents exactly one certificate".into(),
            ));
        }
        let presented = libp2p_tls::certificate::parse(end_entity)?.peer_id();
        *self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(presented);
        match self.expected {
            Some(expected) if expected != presented => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The config offers TLS 1.3 only; refuse rather than panic if this is ever reached.
        Err(rustls::Error::General(
            "potluck nodes speak TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        libp2p_tls::certificate::parse(cert)?.verify_signature(
            dss.scheme,
            message,
            dss.signature(),
        )?;
        Ok(HandshakeSignatureValid::assertion())
    }

    /// The schemes libp2p-tls verifies, in its order of preference.
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn endpoint_outside_a_runtime_is_an_error_not_a_panic() {
        let identity = NodeIdentity::generate();
        let error = endpoint(&identity, "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(error.to_string().contains("tokio runtime"), "{error}");
    }

    #[test]
    fn the_reset_key_signs_and_verifies() {
        use quinn::crypto::HmacKey;
        let key = ResetKey::new(&[7; 32]);
        let mut signature = vec![0; key.signature_len()];
        key.sign(b"connection id", &mut signature);
        assert!(key.verify(b"connection id", &signature).is_ok());
        assert!(key.verify(b"another id", &signature).is_err());
    }

    #[test]
    fn the_reset_key_is_derived_from_the_node_key() {
        let identity = NodeIdentity::generate();
        let a = identity.keypair().derive_secret(RESET_KEY_DOMAIN);
        assert!(a.is_some());
        assert_eq!(a, identity.keypair().derive_secret(RESET_KEY_DOMAIN));
        assert_ne!(
            a,
            NodeIdentity::generate()
                .keypair()
                .derive_secret(RESET_KEY_DOMAIN)
        );
    }

    #[tokio::test]
    async fn a_malformed_expected_id_is_a_clear_error() {
        let identity = NodeIdentity::generate();
        let endpoint = endpoint(&identity, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let error = connect(&endpoint, &identity, addr, Some("not-a-node-id"))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("is not a node id"), "{error}");
    }
}
