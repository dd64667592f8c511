//! LAN discovery: the coordinator announces itself over mDNS and a worker started without
//! `--coordinator HOST:PORT` finds it.
//!
//! We speak libp2p's mDNS profile (service `_p2p._udp.local`, one TXT record
//! `dnsaddr=/ip4/A/tcp/PORT/p2p/ID` per listen address; see libp2p/specs `discovery/mdns.md`)
//! rather than a protocol of our own, so any libp2p tool can see a potluck cluster. libp2p
//! announces a swarm's *listen* addresses, so the advertiser listens on TCP at the cluster's
//! port number: TCP and UDP ports are separate, and the announced `/tcp/PORT` tells a worker
//! that the QUIC endpoint is at UDP `PORT` on the same host. The TCP listener accepts nothing
//! (every connection is refused before any handshake); it exists only to be announced.
//!
//! What it does not defend: mDNS is unauthenticated, so anyone on the LAN can announce
//! anything. A discovered node id is a hint, not a proof; the QUIC handshake (certificates
//! bound to the node's key, see [`super::tls`]) and the join token decide who is the
//! coordinator. libp2p's mDNS ignores loopback interfaces, so discovery needs a real (or
//! virtual, see `examples/netns_cluster.sh`) network interface.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use futures::StreamExt;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{mdns, Multiaddr, PeerId, Swarm};
use libp2p_identity::Keypair;

use super::identity::NodeIdentity;

/// How long [`discover`] listens at most by default. libp2p's mDNS queries at once, then
/// 0.5 s, 1.5 s and 3.5 s later (its probe interval starts at 500 ms and doubles), so 4 s
/// covers four queries: a node on the LAN is missed only if all four or their answers are
/// lost. A node that answers ends the wait much earlier (see [`DISCOVERY_GRACE_MS`]).
pub const DISCOVERY_TIMEOUT_MS: u64 = 4_000;

/// How long [`discover`] keeps listening after the first node answered, for the others
/// (every node on the LAN answers the same query, so their answers arrive within
/// milliseconds of each other; 300 ms leaves room for a busy host or Wi-Fi power saving).
pub const DISCOVERY_GRACE_MS: u64 = 300;

/// Nodes [`discover`] remembers at most; announcements from further nodes are ignored, so a
/// flood of forged announcements cannot grow memory without bound. A home cluster has a
/// handful of nodes.
pub const DISCOVERED_NODES_MAX: usize = 64;

/// Addresses remembered per node at most. mDNS replaces the announced IP with the one the
/// answer came from, so a node has one address per network interface it answers on.
pub const ADDRESSES_PER_NODE_MAX: usize = 16;

/// How long [`advertise`] waits for its thread to bind the TCP listener and start mDNS
/// before giving up (both take milliseconds; this only bounds a wedged system call).
pub const ADVERTISER_START_TIMEOUT_MS: u64 = 5_000;

/// How long dropping an [`Advertiser`] waits for its runtime to shut down (it takes well
/// under a millisecond: the bound only keeps a wedged thread from hanging the caller).
pub const ADVERTISER_STOP_TIMEOUT_MS: u64 = 1_000;

const _: () = assert!(DISCOVERY_GRACE_MS < DISCOVERY_TIMEOUT_MS);

/// A node announcing itself on the LAN, as long as this value lives.
///
/// The swarm runs on a thread of its own with its own single-threaded tokio runtime, not as
/// a task on the caller's runtime: libp2p-mdns 0.48 starts one task per interface address
/// with `tokio::spawn` and never aborts them when its behaviour is dropped (it has no `Drop`),
/// so those tasks would go on answering queries with our last addresses. Dropping the
/// runtime is the one way to be sure they stop. Dropping [`Advertiser`] does that and waits
/// for it (bounded by [`ADVERTISER_STOP_TIMEOUT_MS`]), so once `drop` returns the node is
/// silent and the TCP port is free again.
#[derive(Debug)]
pub struct Advertiser {
    node_id: String,
    cluster_port: u16,
    /// Dropping the sender wakes the advertiser's thread, which then drops its runtime.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Closed (or sent to) by the thread once its runtime, and every mDNS task, is gone.
    stopped: std::sync::mpsc::Receiver<()>,
}

impl Advertiser {
    /// The node id (base58 peer id) being announced.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The announced port: TCP here, and by convention the cluster's QUIC (UDP) port.
    pub fn cluster_port(&self) -> u16 {
        self.cluster_port
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        drop(self.stop.take());
        let timeout = Duration::from_millis(ADVERTISER_STOP_TIMEOUT_MS);
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = self.stopped.recv_timeout(timeout)
        {
            tracing::warn!(
                "the mDNS advertiser did not stop within {ADVERTISER_STOP_TIMEOUT_MS} ms"
            );
        }
    }
}

/// Starts announcing `identity` on the LAN with `cluster_port`, the coordinator's QUIC
/// (UDP) port: the swarm listens on TCP `0.0.0.0:cluster_port`, and mDNS announces
/// `/ip4/A/tcp/cluster_port/p2p/ID` for every non-loopback IPv4 address A of this host.
///
/// Works inside or outside a tokio runtime (the swarm has a thread and runtime of its own,
/// see [`Advertiser`]); blocks the caller only until the listener is bound (milliseconds,
/// at most [`ADVERTISER_START_TIMEOUT_MS`]). Fails when the TCP port is taken or mDNS
/// cannot start.
pub fn advertise(identity: &NodeIdentity, cluster_port: u16) -> anyhow::Result<Advertiser> {
    ensure!(
        cluster_port != 0,
        "cannot announce cluster port 0: pass the port the QUIC endpoint actually bound"
    );
    let keypair = identity.keypair().clone();
    let (started_sender, started) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let (stop, stop_requested) = tokio::sync::oneshot::channel::<()>();
    let (stopped_sender, stopped) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("mdns-advertiser".into())
        .spawn(move || {
            run_advertiser(keypair, cluster_port, started_sender, stop_requested);
            // `run_advertiser`'s runtime is gone by now, and with it every mDNS task.
            let _ = stopped_sender.send(());
        })
        .context("cannot start the mDNS advertiser thread")?;
    let start_timeout = Duration::from_millis(ADVERTISER_START_TIMEOUT_MS);
    match started.recv_timeout(start_timeout) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(anyhow!(
                "the mDNS advertiser did not start within {ADVERTISER_START_TIMEOUT_MS} ms"
            ))
        }
    }
    tracing::info!(
        node_id = %identity.node_id(),
        cluster_port,
        "announcing this node on the LAN (mDNS)"
    );
    Ok(Advertiser {
        node_id: identity.node_id(),
        cluster_port,
        stop: Some(stop),
        stopped,
    })
}

/// The advertiser's thread: reports whether the start worked through `started`, then
/// announces until `stop_requested` resolves (sent or dropped). Its runtime is dropped on
/// return.
fn run_advertiser(
    keypair: Keypair,
    cluster_port: u16,
    started: std::sync::mpsc::SyncSender<anyhow::Result<()>>,
    stop_requested: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match own_runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let swarm = match start_advertising(keypair, cluster_port) {
            Ok(swarm) => swarm,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let _ = started.send(Ok(()));
        tokio::select! {
            _ = stop_requested => tracing::debug!("mDNS announcement stopped"),
            never = announce(swarm) => match never {},
        }
    });
}

/// A node that answered [`discover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The node id it announced (base58 peer id); unverified until the QUIC handshake.
    pub node_id: String,
    /// Where its cluster (QUIC, UDP) endpoint is: the address its answer came from, with
    /// the announced port. Non-loopback IPv4 first; never empty.
    pub addresses: Vec<SocketAddr>,
}

/// Listens for announcements for up to `timeout` (with a throwaway identity, so this node
/// is never mistaken for a cluster member) and returns the nodes found: as soon as one
/// answers, it waits [`DISCOVERY_GRACE_MS`] more for the others, then returns. Nodes appear
/// in the order they answered, each once, at most [`DISCOVERED_NODES_MAX`]. An empty vec
/// means nothing answered within `timeout`.
///
/// Runs on a thread and runtime of its own for the reason given at [`Advertiser`]; the
/// returned future is runtime-agnostic. Dropping it early leaves that thread to finish
/// within `timeout`.
pub async fn discover(timeout: Duration) -> anyhow::Result<Vec<Discovered>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("mdns-discover".into())
        .spawn(move || {
            let result = own_runtime()
                .and_then(|runtime| runtime.block_on(listen_for_announcements(timeout)));
            // The runtime is dropped by now, and with it every mDNS task.
            let _ = answer.send(result);
        })
        .context("cannot start the mDNS discovery thread")?;
    answered
        .await
        .map_err(|_| anyhow!("the mDNS discovery thread ended without an answer"))?
}

/// The runtime an advertiser or a discovery runs on (see [`Advertiser`] for why).
fn own_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start a tokio runtime for mDNS")
}

/// Builds the swarm and binds the TCP listener whose address mDNS announces. Must run
/// inside the advertiser's runtime (mDNS registers its sockets with the current reactor).
fn start_advertising(keypair: Keypair, cluster_port: u16) -> anyhow::Result<Swarm<Behaviour>> {
    let mut swarm = build_swarm(keypair)?;
    let listen = Multiaddr::empty()
        .with(Protocol::Ip4(Ipv4Addr::UNSPECIFIED))
        .with(Protocol::Tcp(cluster_port));
    swarm.listen_on(listen).with_context(|| {
        format!(
            "cannot listen on TCP port {cluster_port}: LAN discovery announces the cluster port \
             through a TCP listener on the same port number (the cluster itself uses UDP), so \
             TCP {cluster_port} must be free; pick another --cluster-listen port or give workers \
             --coordinator HOST:PORT"
        )
    })?;
    Ok(swarm)
}

/// Drives the advertiser's swarm: mDNS answers queries from inside the swarm's polling.
async fn announce(mut swarm: Swarm<Behaviour>) -> Infallible {
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "announcing address");
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::debug!(%address, "no longer announcing address");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "the announced TCP listener failed");
            }
            SwarmEvent::ListenerClosed { reason, .. } => {
                tracing::warn!(
                    ?reason,
                    "the announced TCP listener closed; mDNS now announces no address"
                );
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, .. } => {
                tracing::trace!(%send_back_addr, "refused a TCP connection (it only marks the port)");
            }
            event => tracing::trace!(?event, "mDNS advertiser event"),
        }
    }
}

/// The discovery side: a swarm that listens on nothing (so it announces no address) and
/// collects what mDNS hears until `timeout`, or [`DISCOVERY_GRACE_MS`] after the first hit.
async fn listen_for_announcements(timeout: Duration) -> anyhow::Result<Vec<Discovered>> {
    let throwaway = NodeIdentity::generate();
    let mut swarm = build_swarm(throwaway.keypair().clone())?;
    let started = tokio::time::Instant::now();
    let mut deadline = started + timeout;
    let mut found = Announcements::default();
    while let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
        let SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) = event
        else {
            continue;
        };
        let had_none = found.is_empty();
        for (peer, address) in list {
            found.insert(peer, &address);
        }
        if had_none && !found.is_empty() {
            let now = tokio::time::Instant::now();
            tracing::debug!(
                elapsed_ms = (now - started).as_millis() as u64,
                "first mDNS answer"
            );
            deadline = deadline.min(now + Duration::from_millis(DISCOVERY_GRACE_MS));
        }
    }
    Ok(found.into_discovered())
}

fn build_swarm(keypair: Keypair) -> anyhow::Result<Swarm<Behaviour>> {
    let mdns = mdns::tokio::Behaviour::new(mdns::Config::default(), keypair.public().to_peer_id())
        .context("cannot start mDNS (is UDP port 5353 usable on this host?)")?;
    let behaviour = Behaviour {
        mdns,
        refuse: RefuseConnections,
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .context("cannot set up the libp2p TCP transport")?
        .with_behaviour(|_| behaviour)
        .unwrap_or_else(|never| match never {})
        .build();
    Ok(swarm)
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    mdns: mdns::tokio::Behaviour,
    refuse: RefuseConnections,
}

/// Refuses every connection, inbound and outbound, before any handshake: discovery needs
/// none, and the advertiser's TCP listener must not become something peers can talk to.
struct RefuseConnections;

#[derive(Debug, thiserror::Error)]
#[error("this libp2p swarm is for mDNS discovery only and accepts no connections")]
struct ConnectionsRefused;

impl NetworkBehaviour for RefuseConnections {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        Err(ConnectionDenied::new(ConnectionsRefused))
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Err(ConnectionDenied::new(ConnectionsRefused))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Err(ConnectionDenied::new(ConnectionsRefused))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Err(ConnectionDenied::new(ConnectionsRefused))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// What [`discover`] heard so far: nodes in the order they first answered, bounded by
/// [`DISCOVERED_NODES_MAX`] and [`ADDRESSES_PER_NODE_MAX`].
#[derive(Debug, Default)]
struct Announcements {
    nodes: Vec<Discovered>,
    /// Node ids we stopped listening to because the list was full (logged once each).
    ignored: HashSet<PeerId>,
}

impl Announcements {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records one `/ip4/A/tcp/PORT/p2p/ID` address of `peer`; anything else is ignored.
    fn insert(&mut self, peer: PeerId, address: &Multiaddr) {
        let Some(socket_address) = cluster_address(peer, address) else {
            tracing::debug!(%peer, %address, "ignoring an announced address that is not IP + TCP port");
            return;
        };
        let node_id = peer.to_base58();
        let index = match self.nodes.iter().position(|node| node.node_id == node_id) {
            Some(index) => index,
            None if self.nodes.len() >= DISCOVERED_NODES_MAX => {
                if self.ignored.len() < DISCOVERED_NODES_MAX && self.ignored.insert(peer) {
                    tracing::warn!(%peer, "ignoring an mDNS announcement: already {DISCOVERED_NODES_MAX} nodes found");
                }
                return;
            }
            None => {
                self.nodes.push(Discovered {
                    node_id,
                    addresses: Vec::new(),
                });
                self.nodes.len() - 1
            }
        };
        let addresses = &mut self.nodes[index].addresses;
        if !addresses.contains(&socket_address) && addresses.len() < ADDRESSES_PER_NODE_MAX {
            addresses.push(socket_address);
        }
    }

    /// The nodes, each with its addresses best first: non-loopback IPv4, then other
    /// non-loopback, then loopback (stable, so ties keep the order they were heard in).
    fn into_discovered(self) -> Vec<Discovered> {
        let mut nodes = self.nodes;
        for node in &mut nodes {
            node.addresses
                .sort_by_key(|address| (address.ip().is_loopback(), !address.is_ipv4()));
        }
        nodes
    }
}

/// `/ip4/A/tcp/PORT[/p2p/ID]` (or `/ip6/…`) as `A:PORT`, if the `/p2p/` part, when present,
/// names `peer` (libp2p appends it; a mismatch is a malformed or forged record).
fn cluster_address(peer: PeerId, address: &Multiaddr) -> Option<SocketAddr> {
    let mut parts = address.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    let Protocol::Tcp(port) = parts.next()? else {
        return None;
    };
    match parts.next() {
        None => {}
        Some(Protocol::P2p(named)) if named == peer => {}
        Some(_) => return None,
    }
    if parts.next().is_some() || port == 0 {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        NodeIdentity::generate().peer_id()
    }

    fn address(text: &str) -> Multiaddr {
        text.parse().unwrap()
    }

    fn socket(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cluster_address_reads_ip_and_tcp_port() {
        let peer = peer();
        let with_id = address(&format!("/ip4/10.77.0.1/tcp/7070/p2p/{peer}"));
        assert_eq!(
            cluster_address(peer, &with_id),
            Some(socket("10.77.0.1:7070"))
        );
        assert_eq!(
            cluster_address(peer, &address("/ip6/fe80::1/tcp/7070")),
            Some(socket("[fe80::1]:7070"))
        );
    }

    #[test]
    fn cluster_address_refuses_other_shapes_and_other_peers() {
        let peer = peer();
        let other = self::peer();
        for text in [
            "/ip4/10.0.0.1/udp/7070".to_string(),
            "/dns4/example.com/tcp/7070".to_string(),
            "/ip4/10.0.0.1/tcp/0".to_string(),
            format!("/ip4/10.0.0.1/tcp/7070/p2p/{other}"),
            format!("/ip4/10.0.0.1/tcp/7070/p2p/{peer}/p2p-circuit"),
        ] {
            assert_eq!(cluster_address(peer, &address(&text)), None, "{text}");
        }
    }

    #[test]
    fn announcements_deduplicate_and_keep_answer_order() {
        let (first, second) = (peer(), peer());
        let mut found = Announcements::default();
        found.insert(first, &address("/ip4/10.0.0.1/tcp/7070"));
        found.insert(second, &address("/ip4/10.0.0.2/tcp/7070"));
        found.insert(first, &address("/ip4/10.0.0.1/tcp/7070"));
        found.insert(first, &address("/ip4/192.168.1.5/tcp/7070"));
        let nodes = found.into_discovered();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].node_id, first.to_base58());
        assert_eq!(
            nodes[0].addresses,
            vec![socket("10.0.0.1:7070"), socket("192.168.1.5:7070")]
        );
        assert_eq!(nodes[1].node_id, second.to_base58());
    }

    #[test]
    fn non_loopback_ipv4_comes_first() {
        let node = peer();
        let mut found = Announcements::default();
        for text in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip4/10.0.0.1/tcp/1",
            "/ip6/::1/tcp/1",
        ] {
            found.insert(node, &address(text));
        }
        let addresses: Vec<String> = found.into_discovered()[0]
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addresses,
            ["10.0.0.1:1", "[fe80::1]:1", "127.0.0.1:1", "[::1]:1"]
        );
    }

    #[test]
    fn announcements_are_bounded() {
        let mut found = Announcements::default();
        for _ in 0..DISCOVERED_NODES_MAX + 5 {
            found.insert(peer(), &address("/ip4/10.0.0.1/tcp/7070"));
        }
        let crowded = peer();
        found.insert(crowded, &address("/ip4/10.0.0.9/tcp/7070"));
        assert_eq!(found.nodes.len(), DISCOVERED_NODES_MAX);
        let first = found.nodes[0].node_id.parse::<PeerId>().unwrap();
        for port in 1..=(ADDRESSES_PER_NODE_MAX as u16 + 5) {
            found.insert(first, &address(&format!("/ip4/10.0.0.1/tcp/{port}")));
        }
        assert_eq!(found.nodes[0].addresses.len(), ADDRESSES_PER_NODE_MAX);
    }

    #[test]
    fn advertise_refuses_port_zero() {
        let error = advertise(&NodeIdentity::generate(), 0).unwrap_err();
        assert!(error.to_string().contains("port 0"), "{error:#}");
    }

    /// Loopback has no mDNS, but starting and stopping must work anywhere, and a taken TCP
    /// port must be a clear error.
    #[test]
    fn advertise_starts_stops_and_reports_a_taken_port() {
        let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = advertise(&NodeIdentity::generate(), port).unwrap_err();
        assert!(
            format!("{error:#}").contains(&format!("TCP port {port}")),
            "{error:#}"
        );
        drop(taken);
        let identity = NodeIdentity::generate();
        let advertiser = advertise(&identity, port).unwrap();
        assert_eq!(advertiser.node_id(), identity.node_id());
        assert_eq!(advertiser.cluster_port(), port);
        drop(advertiser);
        // The drop waited for the runtime to go: the port is free at once.
        std::net::TcpListener::bind(("0.0.0.0", port)).expect("the port is free after the drop");
    }
}
