//! The QUIC endpoint between real nodes on 127.0.0.1: the handshake proves both node ids,
//! protocol frames cross a stream, and what must not connect does not (a wrong expected id,
//! stray datagrams, TLS clients without a node certificate or without our ALPN), while the
//! endpoint keeps serving good nodes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_protocol::{Activations, Dtype, Message, Segment};
use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::net::identity::NodeIdentity;
use potluck_node::net::tls::{connect, endpoint, peer_node_id, ALPN, IDLE_TIMEOUT_MS};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// TLS alerts (RFC 8446 §6), as quinn reports a peer's alert: the server requires a client
/// certificate, and an ALPN it knows.
const CERTIFICATE_REQUIRED: &str = "error 116";
const NO_APPLICATION_PROTOCOL: &str = "error 120";

/// Longest any single step of a test may take before it counts as hung.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// How one incoming connection attempt ended on the server: the proven peer id and the
/// connection, or why the handshake failed.
type Outcome = Result<(String, quinn::Connection), String>;

/// A listening node that accepts every attempt and reports each outcome.
struct Server {
    identity: NodeIdentity,
    addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    _endpoint: quinn::Endpoint,
}

impl Server {
    fn start() -> Self {
        let identity = NodeIdentity::generate();
        let endpoint = endpoint(&identity, loopback()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, outcomes) = mpsc::unbounded_channel();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let outcome = match incoming.await {
                        Ok(connection) => peer_node_id(&connection)
                            .map(|id| (id, connection))
                            .map_err(|e| format!("{e:#}")),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tx.send(outcome);
                });
            }
        });
        Self {
            identity,
            addr,
            outcomes,
            _endpoint: endpoint,
        }
    }

    async fn next_outcome(&mut self) -> Outcome {
        timeout(STEP_TIMEOUT, self.outcomes.recv())
            .await
            .expect("the server saw no connection attempt in time")
            .expect("the accept loop ended")
    }

    /// Skips failed attempts up to the next established connection; returns it and how
    /// many failures came before it.
    async fn next_established(&mut self) -> ((String, quinn::Connection), Vec<String>) {
        let mut failures = Vec::new();
        loop {
            match self.next_outcome().await {
                Ok(established) => return (established, failures),
                Err(e) => failures.push(e),
            }
        }
    }
}

/// A second node with its own identity and endpoint.
fn client() -> (NodeIdentity, quinn::Endpoint) {
    let identity = NodeIdentity::generate();
    let endpoint = endpoint(&identity, loopback()).unwrap();
    (identity, endpoint)
}

fn activations() -> Message {
    let rows = 3u32;
    let hidden = 2048u32;
    let payload = (0..rows * hidden * Dtype::F16.size_bytes())
        .map(|i| (i % 251) as u8)
        .collect();
    Message::Activations(Activations {
        step: 7,
        segments: vec![Segment {
            sequence_id: 42,
            first_position: 5,
            n_rows: rows,
            sample: true,
            allowed: None,
            draft: Vec::new(),
        }],
        dtype: Dtype::F16,
        hidden,
        payload,
    })
}

#[tokio::test]
async fn two_nodes_prove_their_ids_and_carry_frames_on_a_stream() {
    let mut server = Server::start();
    let (client_identity, client_endpoint) = client();
    let server_id = server.identity.node_id();

    let connection = connect(
        &client_endpoint,
        &client_identity,
        server.addr,
        Some(&server_id),
    )
    .await
    .unwrap();
    assert_eq!(peer_node_id(&connection).unwrap(), server_id);
    let (client_seen_by_server, server_connection) = server.next_outcome().await.unwrap();
    assert_eq!(client_seen_by_server, client_identity.node_id());
    assert_eq!(
        peer_node_id(&server_connection).unwrap(),
        client_identity.node_id()
    );
    assert_eq!(
        connection
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol,
        Some(ALPN.to_vec())
    );

    let sent = vec![Message::Ready, activations()];
    let expected = sent.clone();
    let serving = tokio::spawn(async move {
        let (send, receive) = server_connection.accept_bi().await.unwrap();
        let mut reader = FrameReader::new(receive);
        let mut got = Vec::new();
        while let Some(message) = reader.recv().await.unwrap() {
            got.push(message);
        }
        let mut writer = FrameWriter::new(send);
        writer.send(&Message::Shutdown).await.unwrap();
        writer.into_inner().finish().unwrap();
        // Keep the connection until the client has read the reply.
        server_connection.closed().await;
        got
    });

    let (send, receive) = connection.open_bi().await.unwrap();
    let mut writer = FrameWriter::new(send);
    for message in &sent {
        writer.send(message).await.unwrap();
    }
    writer.into_inner().finish().unwrap();
    let mut reader = FrameReader::new(receive);
    let reply = timeout(STEP_TIMEOUT, reader.recv()).await.unwrap().unwrap();
    assert_eq!(reply, Some(Message::Shutdown));
    assert_eq!(
        timeout(STEP_TIMEOUT, reader.recv()).await.unwrap().unwrap(),
        None
    );
    connection.close(potluck_protocol::close::LEAVING.into(), b"done");

    let got = timeout(STEP_TIMEOUT, serving).await.unwrap().unwrap();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_wrong_expected_id_fails_the_handshake_and_the_server_sees_no_connection() {
    let mut server = Server::start();
    let (client_identity, client_endpoint) = client();
    let someone_else = NodeIdentity::generate().node_id();

    let error = connect(
        &client_endpoint,
        &client_identity,
        server.addr,
        Some(&someone_else),
    )
    .await
    .unwrap_err();
    let message = format!("{error:#}");
    let expected_message = format!(
        "{} is node {}, expected {someone_else}",
        server.addr,
        server.identity.node_id()
    );
    assert_eq!(message, expected_message);
    assert!(
        server.next_outcome().await.is_err(),
        "the server must not see an established connection"
    );

    // The right id still works on the same endpoints.
    let connection = connect(
        &client_endpoint,
        &client_identity,
        server.addr,
        Some(&server.identity.node_id()),
    )
    .await
    .unwrap();
    let ((id, _), failures) = server.next_established().await;
    assert_eq!(id, client_identity.node_id());
    assert!(failures.is_empty(), "{failures:?}");
    drop(connection);
}

#[tokio::test]
async fn a_silent_address_is_reported_as_no_potluck_node() {
    // A bound socket that never answers (so no ICMP "port unreachable" either).
    let silent = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let addr = silent.local_addr().unwrap();
    let (identity, endpoint) = client();
    let started = Instant::now();
    let error = connect(&endpoint, &identity, addr, None).await.unwrap_err();
    let message = format!("{error:#}");
    assert_eq!(
        message,
        format!(
            "no potluck node answered at {addr} within {} s",
            IDLE_TIMEOUT_MS / 1000
        )
    );
    assert!(started.elapsed() < STEP_TIMEOUT);
}

#[tokio::test]
async fn garbage_and_foreign_tls_clients_cannot_connect_and_the_server_keeps_serving() {
    let mut server = Server::start();

    // Stray datagrams: too short to be QUIC, a long header with an unknown version, and
    // a QUIC v1 Initial whose protection cannot be removed.
    let stray = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    stray
        .send_to(b"GET / HTTP/1.1\r\nHost: potluck\r\n\r\n", server.addr)
        .await
        .unwrap();
    let mut unknown_version = vec![0xc0, 0x0a, 0x0a, 0x0a, 0x0a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 8];
    unknown_version.extend((0..1200).map(|i| (i * 7 % 256) as u8));
    stray.send_to(&unknown_version, server.addr).await.unwrap();
    let mut bad_initial = vec![
        0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0x44, 0xc0,
    ];
    bad_initial.extend((0..1200).map(|i| (i * 13 % 256) as u8));
    stray.send_to(&bad_initial, server.addr).await.unwrap();

    // A TLS client that trusts anything but has no certificate: the server requires one.
    let no_certificate = rustls_client_without_certificate();
    let refused = foreign_client_is_refused(no_certificate, server.addr).await;
    assert!(refused.contains(CERTIFICATE_REQUIRED), "{refused}");

    // A libp2p node (a real node certificate) offering the `libp2p` ALPN, not ours.
    let libp2p_node = libp2p_identity::Keypair::generate_ed25519();
    let libp2p_client = libp2p_tls::make_client_config(&libp2p_node, None).unwrap();
    let refused = foreign_client_is_refused(libp2p_client, server.addr).await;
    assert!(refused.contains(NO_APPLICATION_PROTOCOL), "{refused}");

    // Our own certificate but no ALPN at all.
    let mut no_alpn = libp2p_tls::make_client_config(&libp2p_node, None).unwrap();
    no_alpn.alpn_protocols.clear();
    let refused = foreign_client_is_refused(no_alpn, server.addr).await;
    assert!(refused.contains(NO_APPLICATION_PROTOCOL), "{refused}");

    // A good node still gets in, and is the only one the server ever established.
    let (identity, endpoint) = client();
    let connection = connect(&endpoint, &identity, server.addr, None)
        .await
        .unwrap();
    assert_eq!(
        peer_node_id(&connection).unwrap(),
        server.identity.node_id()
    );
    let ((id, _), failures) = server.next_established().await;
    assert_eq!(id, identity.node_id());
    assert_eq!(
        failures.len(),
        3,
        "each foreign client is one failed attempt: {failures:?}"
    );
}

#[tokio::test]
async fn a_restarted_node_resets_its_old_connections_at_once() {
    let server_identity = NodeIdentity::generate();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
    let identity = server_identity.clone();
    // The first life of the server runs on its own runtime, so it can die abruptly.
    let first_life = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handles = runtime.block_on(async {
            let endpoint = endpoint(&identity, loopback()).unwrap();
            addr_tx.send(endpoint.local_addr().unwrap()).unwrap();
            let connection = endpoint.accept().await.unwrap().await.unwrap();
            (endpoint, connection)
        });
        crash_rx.recv().unwrap();
        // A crash: every task stops where it is; no CONNECTION_CLOSE is ever sent.
        drop(runtime);
        drop(handles);
    });
    let addr = addr_rx.recv().unwrap();
    let (identity, client_endpoint) = client();
    let connection = connect(
        &client_endpoint,
        &identity,
        addr,
        Some(&server_identity.node_id()),
    )
    .await
    .unwrap();
    crash_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || first_life.join().unwrap())
        .await
        .unwrap();

    // Its second life: same key, same port. The client's next keep-alive reaches it, and
    // the reset key derived from the node key makes its stateless reset valid.
    let started = Instant::now();
    let _second_life = endpoint(&server_identity, addr).unwrap();
    let error = timeout(STEP_TIMEOUT, connection.closed()).await.unwrap();
    assert!(matches!(error, quinn::ConnectionError::Reset), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(IDLE_TIMEOUT_MS),
        "reset after {:?}, no sooner than the idle timeout",
        started.elapsed()
    );
}

/// Dials `addr` with a plain quinn client using `crypto`, and returns how the connection
/// ended: it must fail during the handshake, or (TLS 1.3 lets a client finish before the
/// server has checked its certificate) be closed by the server right after.
async fn foreign_client_is_refused(mut crypto: rustls::ClientConfig, addr: SocketAddr) -> String {
    crypto.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let connecting = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "potluck")
        .unwrap();
    let error = match timeout(STEP_TIMEOUT, connecting)
        .await
        .expect("the handshake hung")
    {
        Err(e) => e,
        Ok(connection) => timeout(STEP_TIMEOUT, connection.closed())
            .await
            .expect("the server kept the connection"),
    };
    assert!(
        !matches!(error, quinn::ConnectionError::TimedOut),
        "refused, not ignored: {error}"
    );
    error.to_string()
}

/// What an arbitrary QUIC client looks like: our ALPN, any server certificate accepted,
/// no client certificate.
fn rustls_client_without_certificate() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ED25519,
        ]
    }
}
