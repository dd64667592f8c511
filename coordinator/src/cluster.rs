//! The coordinator's side of the cluster: the QUIC endpoint workers join, the membership
//! driver, planning, assignments, weight serving, and the cluster pipeline handed to the
//! generation thread.
//!
//! One async task — the **driver** — owns [`Membership`] (the pure state machine), the plan
//! in force and every worker connection's handle. Connection tasks only translate: they read
//! frames and post [`Event`]s to the driver, and write what the driver queues. So every
//! decision is made in one place, in order, with the time passed in.
//!
//! A plan becomes a pipeline in three moves: the driver sends each planned worker its
//! [`Assignment`] (which layers, the tensors with their hashes, who feeds it and whom it
//! feeds); each worker fetches what its cache lacks over a weight stream ([`WeightServer`])
//! and says Ready; when every stage is ready the driver builds a [`ClusterPipeline`] and
//! hands it to the generation service, whose in-flight sequences replay into it. Which step
//! comes next — and which late or repeated input to ignore — is decided by the pure
//! [`Rollout`] state machine (`rollout.rs`); the driver only carries out its actions.
//!
//! Activations and sampled tokens never touch the driver's runtime: the generation thread
//! drives a data endpoint of its own ([`DataPlane`], the cluster port + 1), dials the first
//! worker stage's data endpoint and accepts the last stage's connection, so a token crosses
//! no thread inside the coordinator on its way out or back.

use potluck_protocol::close;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_protocol::{
    Assignment, Dtype, Hello, Message, RefusalCode, Refused, SampledTokens, TensorRef, Welcome,
};
use potluck_shard_planner::{LinkMatrix, LinkProfile, NodeProfile, Objective, Plan, PlanRequest, Workload};
use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::net::identity::NodeIdentity;
use potluck_node::net::token::{proofs_equal, JoinToken};
use potluck_node::net::data::{self, DataLink, DataStream};
use potluck_node::net::{discovery, tls};
use potluck_node::stage::StageRunner;
use tokio::sync::mpsc;

use crate::generation::{GenerationService, ACTIVE_SEQUENCES_MAX};
use crate::membership::{Action, ConnectionId, Membership, NodeState, HEARTBEAT_INTERVAL_MS};
use crate::pipeline::{Pipeline, PipelineError};
use crate::rollout::{self, Rollout};
use crate::snapshot::{ClusterInfo, NodeView, StageView};
use potluck_node::weights::serve::WeightServer;

/// How long a new connection has to open its control stream and say Hello.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Connections being handshaken at once at most; more are refused until one finishes, so a
/// flood of half-open connections cannot exhaust the coordinator.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 16;
/// Links as the planner sees them: the RTT is QUIC's estimate on each worker's control
/// connection (a link between two workers: the worse of their two); the bandwidth is what
/// the worker's last slice delivery reached (the slower of the two), or this (1 Gbit/s
/// Ethernet) until a delivery of at least [`LINK_MEASURE_BYTES_MIN`] has been timed.
pub const LINK_BANDWIDTH_ASSUMED_BYTES_PER_S: u64 = 125_000_000;
/// A weight stream shorter than this says little about the link; it is not used.
pub const LINK_MEASURE_BYTES_MIN: u64 = 4 << 20;
/// The coordinator's own node id in plans.
pub const COORDINATOR_NODE: &str = "coordinator";

/// Which split the coordinator computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlannerKind {
    /// The fastest feasible split under the planner's cost model (docs/planner.md): the
    /// least time per token for one request (a model that fits one fast machine stays there).
    Optimal,
    /// The planner's split for many requests at once: the least time of the slowest stage
    /// or hop, which uses every machine that lowers it and balances the stages' times.
    Throughput,
    /// Layers in proportion to each node's memory, as exo and llama.cpp's RPC split them.
    Proportional,
}

pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub token: JoinToken,
    pub identity: NodeIdentity,
    /// The coordinator may hold layers (always stage 0 when it does).
    pub local_layers: bool,
    /// The coordinator's own device, as the planner sees it.
    pub local_device: NodeProfile,
    pub planner: PlannerKind,
    pub activation_dtype: Dtype,
    /// Plan only once this many workers have joined (until then every layer stays here).
    pub min_workers: usize,
    /// Advertise the cluster on the LAN by mDNS.
    pub mdns: bool,
    pub threads: usize,
    /// Where the weight server keeps tensor hashes across restarts (next to the identity).
    pub hash_store: Option<PathBuf>,
}

/// What the driver publishes of the cluster: the parts of a
/// [`crate::snapshot::ClusterSnapshot`] that membership and the plan decide.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub info: ClusterInfo,
    pub nodes: Vec<NodeView>,
    pub stages: Vec<StageView>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct ClusterStatus {
    view: Arc<RwLock<ClusterView>>,
    /// The running cluster driver's inbox (None on one machine, `--no-cluster`): how the API
    /// asks it for an operator's action.
    driver: Arc<Mutex<Option<mpsc::UnboundedSender<Event>>>>,
}

/// Why a worker could not be drained.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("this coordinator runs no cluster (--no-cluster)")]
    NoCluster,
    #[error("no connected worker has the node id {0}")]
    UnknownWorker(String),
}

impl ClusterStatus {
    pub fn local(n_layers: u32) -> Self {
        let status = Self::default();
        status.update(|v| {
            v.stages = vec![StageView {
                node_id: COORDINATOR_NODE.into(),
                name: COORDINATOR_NODE.into(),
                layers: [0, n_layers],
                ..StageView::default()
            }]
        });
        status
    }

    pub fn snapshot(&self) -> ClusterView {
        self.view.read().expect("cluster view lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut ClusterView)) {
        f(&mut self.view.write().expect("cluster view lock"));
    }

    /// Drains a worker (the dashboard's control, `POST /admin/workers/{id}/drain`): the
    /// coordinator tells it to shut down, it leaves as on SIGTERM (its process exits 0), and
    /// the cluster re-plans over the others at once; answers in flight replay and go on.
    /// Returns the worker's name.
    pub async fn drain(&self, node_id: &str) -> Result<String, DrainError> {
        let driver = self.driver.lock().expect("driver lock").clone().ok_or(DrainError::NoCluster)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        driver.send(Event::Drain { node_id: node_id.to_string(), reply }).map_err(|_| DrainError::NoCluster)?;
        answer.await.map_err(|_| DrainError::NoCluster)?
    }
}

/// Handle to the running cluster side.
pub struct Cluster {
    pub status: ClusterStatus,
    pub local_address: SocketAddr,
    pub node_id: String,
    _advertiser: Option<discovery::Advertiser>,
}

enum Event {
    Hello {
        connection_id: ConnectionId,
        connection: quinn::Connection,
        hello: Hello,
        token_ok: bool,
        control: mpsc::UnboundedSender<Message>,
        tensors: Arc<Mutex<Vec<TensorRef>>>,
    },
    Control { connection_id: ConnectionId, message: Message },
    Closed { connection_id: ConnectionId, reason: String },
    /// A planned stage's weights are hashed (blocking work done); send its assignment.
    AssignmentReady { generation: u64, node_id: String, assignment: Assignment },
    PlanFailed { generation: u64, reason: String },
    /// A weight stream to a worker finished: how many bytes in how long (a link measurement).
    WeightsDelivered { connection_id: ConnectionId, bytes: u64, elapsed: Duration },
    /// The operator drains a worker.
    Drain { node_id: String, reply: tokio::sync::oneshot::Sender<Result<String, DrainError>> },
}

struct Worker {
    node_id: String,
    name: String,
    connection: quinn::Connection,
    /// Its data endpoint: the control connection's IP and the port its Hello gave.
    data_address: SocketAddr,
    control: mpsc::UnboundedSender<Message>,
    tensors: Arc<Mutex<Vec<TensorRef>>>,
}

/// How the driver tells the pipeline in force that it is broken (a stage left).
type BrokenRoute = Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>;

/// The coordinator's data plane: a data endpoint (`net::tls::Plane::Data`) on a
/// current-thread runtime that only the generation thread drives, inside
/// [`ClusterPipeline`]'s `send` and `recv`. Its acceptor keeps connections from welcomed
/// workers and queues their data streams (the last stage's sampled tokens).
pub struct DataPlane {
    runtime: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    identity: Arc<NodeIdentity>,
    local_addr: SocketAddr,
    /// Node ids that may open data connections to us: the welcomed workers.
    allowed: Arc<Mutex<BTreeSet<String>>>,
    /// Data streams as the acceptor takes them, with their connection and the peer's id.
    streams: Mutex<mpsc::UnboundedReceiver<DataStream>>,
}

impl DataPlane {
    fn start(identity: Arc<NodeIdentity>, bind: SocketAddr) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the data plane's runtime")?;
        let endpoint = {
            let _context = runtime.enter();
            tls::endpoint_for(tls::Plane::Data, &identity, bind)
                .with_context(|| format!("cannot open the data endpoint on UDP {bind} (is the port in use?)"))?
        };
        let local_addr = endpoint.local_addr()?;
        let allowed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let is_member = {
            let allowed = allowed.clone();
            move |peer: &str| allowed.lock().expect("allowed lock").contains(peer)
        };
        let on_stream = move |stream| {
            let _ = streams_tx.send(stream);
        };
        runtime.spawn(data::accept_members(endpoint.clone(), is_member, on_stream));
        Ok(Self { runtime: Some(runtime), endpoint, identity, local_addr, allowed, streams: Mutex::new(streams) })
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.as_ref().expect("the runtime lives until drop").block_on(future)
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.endpoint.close(close::LEAVING.into(), b"coordinator stopping");
        // May be dropped inside the driver's runtime, where blocking is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts the cluster side: binds the endpoint, advertises it, and spawns the driver.
pub async fn start(
    config: ClusterConfig,
    model_path: PathBuf,
    profile: ModelProfile,
    service: GenerationService,
    status: ClusterStatus,
    whole_model_local: bool,
) -> Result<Cluster> {
    tls::install_crypto_provider();
    let endpoint = tls::endpoint(&config.identity, config.listen)
        .with_context(|| format!("cannot open the cluster endpoint on {} (is the port in use?)", config.listen))?;
    let local_address = endpoint.local_addr()?;
    let node_id = config.identity.node_id();
    let advertiser = if config.mdns {
        match discovery::advertise(&config.identity, local_address.port()) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "mDNS advertising failed; workers need --coordinator");
                None
            }
        }
    } else {
        None
    };
    let weights = Arc::new(
        tokio::task::spawn_blocking({
            let path = model_path.clone();
            let store = config.hash_store.clone();
            move || {
                let server = WeightServer::open(&path)?;
                anyhow::Ok(match store {
                    Some(dir) => server.with_hash_store(&dir),
                    None => server,
                })
            }
        })
        .await??,
    );
    let join_command = format!(
        "worker join --token {} --coordinator {}",
        config.token.as_str(),
        advertised_address(local_address)
    );
    status.update(|v| {
        v.info.node_id = node_id.clone();
        v.info.listen = local_address.to_string();
        // `/health`, `/events` and the dashboard are open to anyone who reaches the HTTP
        // port (the API key guards /v1 only): they never carry the join token itself,
        // which would let any such reader join as a worker and see weights and prompts.
        v.info.join_command = format!("worker join --token <join token> --coordinator {}", advertised_address(local_address));
    });
    println!("potluck: cluster endpoint on {local_address} (QUIC), node id {node_id}");
    println!("  join from other machines with:\n    {join_command}");
    if config.mdns {
        println!("  (on the same LAN, `worker join --token {}` finds this coordinator by itself)", config.token.as_str());
    }

    // The data endpoint: the next port up (so a firewall rule can name both), or any free
    // port when the cluster port was left to the OS.
    let data_bind = SocketAddr::new(local_address.ip(), if config.listen.port() == 0 { 0 } else { local_address.port().wrapping_add(1) });
    let identity = Arc::new(config.identity.clone());
    let data = Arc::new(DataPlane::start(identity, data_bind)?);
    println!("potluck: data endpoint on {} (QUIC)", data.local_addr);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    status.driver.lock().expect("driver lock").replace(events_tx.clone());
    let broken_route: BrokenRoute = Arc::new(Mutex::new(None));
    spawn_acceptor(endpoint.clone(), config.token.clone(), node_id.clone(), events_tx.clone(), weights.clone());
    let driver = Driver {
        config,
        model_path,
        profile,
        service,
        status: status.clone(),
        membership: Membership::new(),
        workers: BTreeMap::new(),
        events: events_tx,
        weights,
        broken_route,
        data,
        clock: Instant::now(),
        plan: None,
        plan_generation: 0,
        rollout: Rollout::new(),
        ready_owed: BTreeMap::new(),
        node_id: node_id.clone(),
        whole_model_local,
        first_split_done: false,
        plan_connections: BTreeMap::new(),
        link_bandwidth: BTreeMap::new(),
    };
    tokio::spawn(driver.run(events_rx));
    Ok(Cluster { status, local_address, node_id, _advertiser: advertiser })
}

/// The address to print in the join line: a wildcard bind is shown as this host's LAN address
/// when one can be found.
fn advertised_address(local: SocketAddr) -> String {
    if !local.ip().is_unspecified() {
        return local.to_string();
    }
    // The address the OS would use to reach a LAN host (no packet is sent by connect on UDP).
    let lan = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.168.0.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip());
    match lan {
        Ok(ip) if !ip.is_unspecified() => SocketAddr::new(ip, local.port()).to_string(),
        _ => format!("THIS_HOST:{}", local.port()),
    }
}

fn spawn_acceptor(
    endpoint: quinn::Endpoint,
    token: JoinToken,
    coordinator_id: String,
    events: mpsc::UnboundedSender<Event>,
    weights: Arc<WeightServer>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
    tokio::spawn(async move {
        let mut next_id: ConnectionId = 1;
        while let Some(incoming) = endpoint.accept().await {
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(remote = %incoming.remote_address(), "too many handshakes in flight; refusing a connection");
                incoming.refuse();
                continue;
            };
            let connection_id = next_id;
            next_id += 1;
            let (token, coordinator_id, events, weights) =
                (token.clone(), coordinator_id.clone(), events.clone(), weights.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(
                    Duration::from_millis(HELLO_TIMEOUT_MS),
                    handshake(incoming, connection_id, &token, &coordinator_id),
                )
                .await;
                drop(permit);
                let (connection, hello, token_ok, control_out, control_in) = match handshake {
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => return tracing::info!(error = format!("{e:#}"), "a connection failed before Hello"),
                    Err(_) => return tracing::info!("a connection did not say Hello in time"),
                };
                serve_connection(connection_id, connection, hello, token_ok, control_out, control_in, events, weights).await;
            });
        }
    });
}

type Handshake = (quinn::Connection, Hello, bool, FrameWriter<quinn::SendStream>, FrameReader<quinn::RecvStream>);

async fn handshake(incoming: quinn::Incoming, _id: ConnectionId, token: &JoinToken, coordinator_id: &str) -> Result<Handshake> {
    let remote = incoming.remote_address();
    let connection = incoming.await.with_context(|| format!("TLS handshake with {remote} failed"))?;
    let peer = tls::peer_node_id(&connection)?;
    let (send, recv) = connection.accept_bi().await.context("no control stream")?;
    let (mut out, mut input) = (FrameWriter::new(send), FrameReader::new(recv));
    let hello = match input.recv().await {
        Ok(Some(Message::Hello(hello))) => hello,
        Ok(Some(other)) => anyhow::bail!("{remote} opened with {:?}, not Hello", other.kind()),
        Ok(None) => anyhow::bail!("{remote} closed the control stream before Hello"),
        Err(e) => {
            // A peer speaking another protocol version gets a reason it can show its user.
            let refused = Refused { code: RefusalCode::UnsupportedVersion, reason: format!("cannot read your Hello: {e}") };
            let _ = out.send(&Message::Refused(refused)).await;
            let _ = out.get_mut().finish();
            connection.close(close::BAD_HELLO.into(), b"bad hello");
            anyhow::bail!("bad Hello from {remote} ({peer}): {e}")
        }
    };
    if hello.node_id != peer {
        let refused = Refused {
            code: RefusalCode::Other,
            reason: format!("Hello says node {} but your certificate proves {peer}", hello.node_id),
        };
        let _ = out.send(&Message::Refused(refused)).await;
        let _ = out.get_mut().finish();
        connection.close(close::IDENTITY_MISMATCH.into(), b"identity mismatch");
        anyhow::bail!("{remote}: Hello's node id does not match its certificate");
    }
    let token_ok = proofs_equal(&hello.token_proof, &token.worker_proof(coordinator_id, &peer));
    Ok((connection, hello, token_ok, out, input))
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    connection_id: ConnectionId,
    connection: quinn::Connection,
    hello: Hello,
    token_ok: bool,
    mut control_out: FrameWriter<quinn::SendStream>,
    mut control_in: FrameReader<quinn::RecvStream>,
    events: mpsc::UnboundedSender<Event>,
    weights: Arc<WeightServer>,
) {
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Message>();
    let tensors: Arc<Mutex<Vec<TensorRef>>> = Arc::default();
    let _ = events.send(Event::Hello {
        connection_id,
        connection: connection.clone(),
        hello,
        token_ok,
        control: control_tx,
        tensors: tensors.clone(),
    });
    // Writer: what the driver queues. Ends when the driver drops the sender (then finishes
    // the stream, so a refused worker reads the whole Refused before the close).
    let writer = tokio::spawn(async move {
        while let Some(message) = control_rx.recv().await {
            if control_out.send(&message).await.is_err() {
                break;
            }
        }
        let _ = control_out.get_mut().finish();
        let _ = control_out.get_mut().stopped().await;
    });
    if !token_ok {
        // Nothing else is served to a peer without the token: no weights, no data streams.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        connection.close(close::BAD_JOIN_TOKEN.into(), b"bad join token");
        return;
    }
    // Weight fetches: bidirectional streams after the control stream.
    {
        let (connection, weights) = (connection.clone(), weights.clone());
        let (tensors, events) = (tensors.clone(), events.clone());
        tokio::spawn(async move {
            while let Ok((send, recv)) = connection.accept_bi().await {
                let (weights, tensors, events) = (weights.clone(), tensors.clone(), events.clone());
                tokio::spawn(async move {
                    let (mut writer, mut reader) = (FrameWriter::new(send), FrameReader::new(recv));
                    let refs = tensors.lock().expect("tensors lock").clone();
                    let started = Instant::now();
                    match weights.serve_fetch(&refs, &mut reader, &mut writer).await {
                        Ok(bytes) => {
                            tracing::debug!(bytes, "weight stream served");
                            let elapsed = started.elapsed();
                            let _ = events.send(Event::WeightsDelivered { connection_id, bytes, elapsed });
                        }
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "weight stream failed"),
                    }
                    let _ = writer.get_mut().finish();
                });
            }
        });
    }
    loop {
        match control_in.recv().await {
            Ok(Some(message)) => {
                if events.send(Event::Control { connection_id, message }).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = events.send(Event::Closed { connection_id, reason: "closed its control stream".into() });
                return;
            }
            Err(e) => {
                let reason = connection.close_reason().map_or_else(|| e.to_string(), |r| r.to_string());
                let _ = events.send(Event::Closed { connection_id, reason });
                return;
            }
        }
    }
}

struct Driver {
    config: ClusterConfig,
    model_path: PathBuf,
    profile: ModelProfile,
    service: GenerationService,
    status: ClusterStatus,
    membership: Membership,
    workers: BTreeMap<ConnectionId, Worker>,
    events: mpsc::UnboundedSender<Event>,
    weights: Arc<WeightServer>,
    broken_route: BrokenRoute,
    data: Arc<DataPlane>,
    clock: Instant,
    /// The plan the current pipeline runs.
    plan: Option<Plan>,
    plan_generation: u64,
    /// The plan being rolled out, if any (the pure state machine; this driver does its I/O).
    rollout: Rollout<Plan, Assignment>,
    /// Per connection, the plan generations of the assignments sent on it that its Ready has
    /// not answered yet, oldest first: a worker takes its assignments one at a time, in
    /// order, and answers each with one Ready, so a Ready answers the oldest.
    ready_owed: BTreeMap<ConnectionId, VecDeque<u64>>,
    node_id: String,
    /// The generation service still runs the whole model loaded at start-up.
    whole_model_local: bool,
    /// A split has been activated once: `--workers N` holds back only the first.
    first_split_done: bool,
    /// Each worker stage's connection when the plan in force was rolled out: a stage back
    /// on another connection restarted and lost its state.
    plan_connections: BTreeMap<String, ConnectionId>,
    /// Bandwidth to each worker as its last slice delivery measured it (bytes/s).
    link_bandwidth: BTreeMap<String, u64>,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS / 2));
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return,
                },
                _ = tick.tick() => {
                    let now = self.now_ms();
                    if self.membership.poll_timeout().is_some_and(|deadline| deadline <= now) {
                        self.membership.handle_timeout(now);
                    }
                    let actions = self.rollout.tick(now);
                    self.apply(actions).await;
                }
            }
            self.drain_actions().await;
            self.publish();
            // Data connections are taken from the welcomed members with a live connection only.
            let members: BTreeSet<String> = self.member_nodes().into_iter().map(|(n, _)| n.id).collect();
            *self.data.allowed.lock().expect("allowed lock") = members;
        }
    }

    async fn handle(&mut self, event: Event) {
        let now = self.now_ms();
        match event {
            Event::Hello { connection_id, connection, hello, token_ok, control, tensors } => {
                let remote = connection.remote_address();
                if token_ok {
                    tracing::info!(node = %hello.node_id, name = %hello.name, %remote, budget_mib = hello.device.memory_budget_bytes >> 20, "worker joined");
                } else {
                    tracing::warn!(node = %hello.node_id, %remote, "refused a worker: its join token proof did not verify");
                }
                let data_address = SocketAddr::new(remote.ip(), hello.data_port);
                self.workers.insert(
                    connection_id,
                    Worker { node_id: hello.node_id.clone(), name: hello.name.clone(), connection, data_address, control, tensors },
                );
                self.membership.handle_hello(now, connection_id, &hello.node_id, &hello.name, hello.device, token_ok);
            }
            Event::Control { connection_id, message } => match message {
                Message::LoadProgress(p) => {
                    self.membership.handle_load_progress(now, connection_id, p.bytes_done, p.bytes_total);
                    if let Some(w) = self.workers.get(&connection_id) {
                        self.rollout.stage_progress(now, &w.node_id);
                    }
                }
                Message::Ready => {
                    self.membership.handle_ready(now, connection_id);
                    let answered = self.ready_owed.get_mut(&connection_id).and_then(VecDeque::pop_front);
                    if let (Some(generation), Some(w)) = (answered, self.workers.get(&connection_id)) {
                        let node_id = w.node_id.clone();
                        let actions = self.rollout.stage_ready(now, &node_id, generation);
                        self.apply(actions).await;
                    }
                }
                Message::Heartbeat(h) => self.membership.handle_heartbeat(now, connection_id, h.stats),
                other => tracing::warn!(kind = ?other.kind(), connection_id, "unexpected control message from a worker"),
            },
            Event::Closed { connection_id, reason } => {
                let mut actions = Vec::new();
                if let Some(w) = self.workers.get(&connection_id) {
                    tracing::warn!(node = %w.node_id, name = %w.name, %reason, "worker disconnected");
                    actions = self.rollout.stage_left(now, &w.node_id, connection_id);
                }
                self.membership.handle_disconnect(now, connection_id, &reason);
                self.workers.remove(&connection_id);
                self.ready_owed.remove(&connection_id);
                self.apply(actions).await;
            }
            Event::AssignmentReady { generation, node_id, assignment } => {
                let actions = self.rollout.assignment_ready(now, generation, &node_id, assignment);
                self.apply(actions).await;
            }
            Event::Drain { node_id, reply } => {
                let worker = self.workers.values().find(|w| w.node_id == node_id);
                let answer = match worker {
                    Some(worker) => {
                        tracing::info!(node = %node_id, name = %worker.name, "draining a worker at the operator's request: it shuts down and the cluster re-plans");
                        let _ = worker.control.send(Message::Shutdown);
                        Ok(worker.name.clone())
                    }
                    None => Err(DrainError::UnknownWorker(node_id)),
                };
                let _ = reply.send(answer);
            }
            Event::WeightsDelivered { connection_id, bytes, elapsed } => {
                if let Some(w) = self.workers.get(&connection_id) {
                    if bytes >= LINK_MEASURE_BYTES_MIN && !elapsed.is_zero() {
                        let rate = (bytes as f64 / elapsed.as_secs_f64()) as u64;
                        tracing::info!(node = %w.node_id, mib_per_s = rate >> 20, "link measured by the slice delivery");
                        self.link_bandwidth.insert(w.node_id.clone(), rate.max(1));
                    }
                }
            }
            Event::PlanFailed { generation, reason } => {
                let actions = self.rollout.assignment_failed(now, generation, &reason);
                self.apply(actions).await;
            }
        }
    }

    async fn drain_actions(&mut self) {
        let mut replan = None;
        while let Some(action) = self.membership.poll_action() {
            match action {
                Action::Refuse { connection, code, reason } => {
                    if let Some(w) = self.workers.remove(&connection) {
                        let _ = w.control.send(Message::Refused(Refused { code, reason }));
                        // Dropping the sender ends the writer, which finishes the stream.
                    }
                }
                Action::Welcome { connection, node_id, heartbeat_interval_ms } => {
                    if let Some(w) = self.workers.get(&connection) {
                        let token_proof = self.config.token.coordinator_proof(&self.node_id, &node_id);
                        let _ = w.control.send(Message::Welcome(Welcome { heartbeat_interval_ms, token_proof }));
                    }
                }
                Action::Close { connection, reason } => {
                    if let Some(w) = self.workers.remove(&connection) {
                        tracing::warn!(node = %w.node_id, %reason, "closing a worker's connection");
                        w.connection.close(close::REMOVED.into(), reason.as_bytes());
                        self.ready_owed.remove(&connection);
                        let actions = self.rollout.stage_left(self.now_ms(), &w.node_id, connection);
                        self.apply(actions).await;
                    }
                }
                Action::Replan { reason } => replan = Some(reason),
                // The rollout hears each Ready with the generation it answers (see
                // `ready_owed`); membership's view of it is only logged.
                Action::StageReady { node_id } => tracing::info!(node = %node_id, "stage ready"),
            }
        }
        if let Some(reason) = replan {
            self.replan(&reason).await;
        }
    }

    /// Members the planner may use: welcomed workers whose connection is live.
    fn member_nodes(&self) -> Vec<(NodeProfile, ConnectionId)> {
        let by_node: BTreeMap<&str, ConnectionId> = self.workers.iter().map(|(id, w)| (w.node_id.as_str(), *id)).collect();
        self.membership
            .members()
            .filter_map(|(node_id, device)| {
                let connection = *by_node.get(node_id)?;
                Some((potluck_node::node_profile_from_summary(device, node_id), connection))
            })
            .collect()
    }

    async fn replan(&mut self, reason: &str) {
        let members = self.member_nodes();
        // A stage of the plan in force that is no longer a member breaks the pipeline now.
        if let Some(plan) = &self.plan {
            let live: BTreeSet<&str> = members.iter().map(|(n, _)| n.id.as_str()).collect();
            let lost: Vec<&str> = plan
                .stages
                .iter()
                .map(|s| s.node_id.as_str())
                .filter(|id| {
                    // Gone, or back on a new connection (a restart): its stage state is lost.
                    *id != COORDINATOR_NODE
                        && (!live.contains(id)
                            || members.iter().find(|(m, _)| m.id == *id).map(|(_, c)| *c)
                                != self.plan_connections.get(*id).copied())
                })
                .collect();
            if !lost.is_empty() {
                let message = format!("stage node(s) {} left the cluster", lost.join(", "));
                if let Some(broken) = self.broken_route.lock().expect("route lock").take() {
                    let _ = broken.send(message.clone());
                }
                tracing::warn!(%message, "the pipeline is broken; re-planning");
                self.plan = None;
            }
        }
        // `--workers N` holds back the first split only; after that the cluster re-plans
        // over whoever is left.
        let waiting_for_first = !self.first_split_done && members.len() < self.config.min_workers;
        let nobody = members.is_empty() && !self.config.local_layers;
        if waiting_for_first || nobody {
            tracing::info!(%reason, workers = members.len(), needed = self.config.min_workers, "waiting for more workers before planning");
            if self.plan.is_none() && !self.whole_model_local && self.first_split_done {
                // The cluster broke and cannot be re-planned yet: fail requests clearly
                // instead of leaving them hanging. (Before the first split the pipeline is
                // already unavailable, with the reason `load` gave.)
                let message = "the cluster lost its workers and this coordinator keeps no layers (--no-local-layers); \
                               waiting for a worker to join"
                    .to_string();
                let _ = self.service.replace_pipeline(Box::new(crate::pipeline::UnavailablePipeline::new(message)));
            }
            return;
        }
        let mut nodes: Vec<NodeProfile> = Vec::new();
        if self.config.local_layers {
            nodes.push(self.config.local_device.clone());
        }
        nodes.extend(members.iter().map(|(n, _)| n.clone()));
        if nodes.is_empty() {
            return;
        }
        let n = nodes.len();
        let mut links = LinkMatrix::uniform(n, LinkProfile { rtt_us: 0, bandwidth_bytes_per_s: LINK_BANDWIDTH_ASSUMED_BYTES_PER_S });
        let rtt_us: Vec<u64> = nodes
            .iter()
            .map(|node| {
                members
                    .iter()
                    .find(|(m, _)| m.id == node.id)
                    .and_then(|(_, c)| self.workers.get(c))
                    .map_or(0, |w| w.connection.rtt().as_micros() as u64)
            })
            .collect();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let rtt = if nodes[a].id == COORDINATOR_NODE || nodes[b].id == COORDINATOR_NODE {
                        rtt_us[a].max(rtt_us[b])
                    } else {
                        rtt_us[a].max(rtt_us[b]).max(1)
                    };
                    let measured = |i: usize| self.link_bandwidth.get(&nodes[i].id).copied();
                    let bandwidth = match (measured(a), measured(b)) {
                        (Some(x), Some(y)) => x.min(y),
                        (Some(x), None) | (None, Some(x)) if nodes[a].id == COORDINATOR_NODE || nodes[b].id == COORDINATOR_NODE => x,
                        _ => LINK_BANDWIDTH_ASSUMED_BYTES_PER_S,
                    };
                    links.set(a, b, LinkProfile { rtt_us: rtt, bandwidth_bytes_per_s: bandwidth });
                }
            }
        }
        let name = self.model_path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let model = potluck_node::planner_model(&self.profile, &name);
        let workload = Workload {
            context_tokens: self.service.context_length() as u32,
            sequences: ACTIVE_SEQUENCES_MAX as u32,
        };
        let mut request = PlanRequest::new(&model, &nodes, &links, workload);
        if self.config.local_layers {
            request = request.with_first_node(COORDINATOR_NODE);
        }
        if let Some(previous) = &self.plan {
            request = request.with_previous(previous);
        }
        let planned = match self.config.planner {
            PlannerKind::Optimal => potluck_shard_planner::plan(&request),
            PlannerKind::Throughput => potluck_shard_planner::plan(&request.with_objective(Objective::Throughput)),
            PlannerKind::Proportional => potluck_shard_planner::proportional_plan(&request),
        };
        let plan = match planned {
            Ok(p) if p.fits => p,
            Ok(p) => {
                tracing::error!(%reason, "the model does not fit the cluster:\n{}", self.named(&p));
                self.unavailable(format!("the model does not fit the cluster's memory any more ({reason}); add a machine"));
                return;
            }
            Err(e) => {
                tracing::error!(%reason, error = %e, "cannot plan");
                self.unavailable(format!("the cluster cannot run the model any more ({reason}): {e}"));
                return;
            }
        };
        let same = self.plan.as_ref().is_some_and(|current| stages_of(current) == stages_of(&plan));
        if same {
            tracing::info!(%reason, "membership changed; the plan in force stays");
            return;
        }
        let whole_model_here = plan.stages.len() == 1 && plan.stages[0].node_id == COORDINATOR_NODE;
        if whole_model_here && self.whole_model_local {
            tracing::info!(%reason, "the planner keeps every layer on this machine:\n{plan}");
            self.plan = Some(plan);
            return;
        }
        println!("potluck: new plan ({reason}):\n{}", self.named(&plan));
        self.roll_out(plan, &members).await;
    }

    /// The plan's table with each worker's name beside its node id (same width, so the
    /// columns stay aligned): what people read.
    fn named(&self, plan: &Plan) -> String {
        let mut text = plan.to_string();
        for w in self.workers.values() {
            let width = w.node_id.chars().count();
            let short: String = w.node_id.chars().take(12).collect();
            let label: String = format!("{} ({short}…)", w.name).chars().take(width).collect();
            text = text.replace(&w.node_id, &format!("{label:<width$}"));
        }
        text.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
    }

    /// With the pipeline broken and no plan possible, requests in flight and new ones fail
    /// with `message` (HTTP 503) instead of waiting for a plan that cannot come. A later
    /// membership change re-plans and replaces it.
    fn unavailable(&mut self, message: String) {
        if self.plan.is_none() && !self.whole_model_local {
            tracing::error!(%message, "the model is unavailable until the cluster changes");
            let _ = self.service.replace_pipeline(Box::new(crate::pipeline::UnavailablePipeline::new(message)));
        }
    }

    /// Starts rolling out `plan`: builds each worker stage's assignment (hashing its tensors
    /// is blocking work, done off the driver, reported by `Event::AssignmentReady`); the
    /// [`Rollout`] then says when to send them and when to activate.
    async fn roll_out(&mut self, plan: Plan, members: &[(NodeProfile, ConnectionId)]) {
        self.plan_generation += 1;
        let generation = self.plan_generation;
        let stages = &plan.stages;
        let member = |node_id: &str| -> Option<(&Worker, ConnectionId)> {
            let (_, c) = members.iter().find(|(m, _)| m.id == node_id)?;
            Some((self.workers.get(c)?, *c))
        };
        let mut templates = Vec::new();
        let mut connections = BTreeMap::new();
        for (i, stage) in stages.iter().enumerate() {
            if stage.node_id == COORDINATOR_NODE {
                continue;
            }
            let Some((_, connection)) = member(&stage.node_id) else {
                return tracing::error!(node = %stage.node_id, "a planned node has no connection");
            };
            // Stage 0's input comes from the coordinator, and so does a stage after the
            // coordinator's own.
            let upstream_id = match i.checked_sub(1).map(|previous| &stages[previous].node_id) {
                Some(previous) if previous != COORDINATOR_NODE => previous.clone(),
                _ => self.node_id.clone(),
            };
            let (next_stage, next_stage_id) = match stages.get(i + 1) {
                Some(next) => match member(&next.node_id) {
                    Some((w, _)) => (w.data_address, w.node_id.clone()),
                    None => return tracing::error!(node = %next.node_id, "a planned node has no connection"),
                },
                // The last stage answers our data endpoint, at the address it reached us on.
                None => match member(&stage.node_id) {
                    Some((w, _)) => {
                        let ip = w.connection.local_ip().unwrap_or(self.data.local_addr.ip());
                        (SocketAddr::new(ip, self.data.local_addr.port()), self.node_id.clone())
                    }
                    None => return tracing::error!(node = %stage.node_id, "a planned node has no connection"),
                },
            };
            let (next_stage, next_stage_id) = (Some(next_stage.to_string()), Some(next_stage_id));
            let template = Assignment {
                model_hash: self.weights.model_hash(),
                layer_start: stage.layers.start,
                layer_end: stage.layers.end,
                n_layers: self.profile.n_layers,
                next_stage,
                tensors: Vec::new(),
                upstream_id,
                next_stage_id,
                stage_index: i as u32,
                n_stages: stages.len() as u32,
                context_length: self.service.context_length() as u32,
                sequences_max: ACTIVE_SEQUENCES_MAX as u32,
                activation_dtype: self.config.activation_dtype,
                model_profile: serde_json::to_string(&self.profile).expect("a profile serializes"),
            };
            templates.push((stage.node_id.clone(), stage.layers.clone(), template));
            connections.insert(stage.node_id.clone(), connection);
        }
        let actions = self.rollout.plan(self.now_ms(), generation, plan, connections);
        for (node_id, layers, template) in templates {
            let (weights, profile, events) = (self.weights.clone(), self.profile.clone(), self.events.clone());
            tokio::task::spawn_blocking(move || {
                let event = match weights.slice_refs(&profile, layers) {
                    Ok(tensors) => Event::AssignmentReady { generation, node_id, assignment: Assignment { tensors, ..template } },
                    Err(e) => Event::PlanFailed { generation, reason: format!("{e:#}") },
                };
                let _ = events.send(event);
            });
        }
        self.apply(actions).await;
    }

    /// Carries out what the rollout decided.
    async fn apply(&mut self, actions: Vec<rollout::Action<Plan, Assignment>>) {
        for action in actions {
            match action {
                rollout::Action::SendAssignment { generation, node_id, connection, assignment } => {
                    self.send_assignment(generation, &node_id, connection, assignment)
                }
                rollout::Action::Activate { generation: _, plan, connections } => self.activate(plan, connections).await,
                rollout::Action::Abort { generation, reason } => {
                    tracing::error!(generation, %reason, "cannot roll out the plan")
                }
            }
        }
    }

    fn send_assignment(&mut self, generation: u64, node_id: &str, connection: ConnectionId, assignment: Assignment) {
        let Some(worker) = self.workers.get(&connection) else { return };
        let bytes: u64 = assignment.tensors.iter().map(|t| t.bytes).sum();
        *worker.tensors.lock().expect("tensors lock") = assignment.tensors.clone();
        tracing::info!(node = %node_id, name = %worker.name, layers = format!("{}..{}", assignment.layer_start, assignment.layer_end), mib = bytes >> 20, "assignment sent");
        let _ = worker.control.send(Message::Assignment(assignment));
        self.membership.handle_assignment_sent(node_id, bytes);
        self.ready_owed.entry(connection).or_default().push_back(generation);
    }

    /// Every stage of `plan` is ready: build its pipeline and move generation onto it.
    async fn activate(&mut self, plan: Plan, connections: BTreeMap<String, ConnectionId>) {
        match self.build_pipeline(&plan).await {
            Ok(pipeline) => {
                tracing::info!(pipeline = %pipeline.describe(), predicted_tokens_per_s = plan.tokens_per_s, "cluster pipeline active");
                println!("potluck: cluster ready: {}", pipeline.describe());
                if self.service.replace_pipeline(pipeline).is_err() {
                    tracing::error!("the generation service has stopped");
                }
                let named_plan = self.named(&plan);
                self.status.update(|v| {
                    v.stages = plan
                        .stages
                        .iter()
                        .map(|s| StageView {
                            node_id: s.node_id.clone(),
                            name: self
                                .workers
                                .values()
                                .find(|w| w.node_id == s.node_id)
                                .map_or_else(|| s.node_id.clone(), |w| w.name.clone()),
                            layers: [s.layers.start, s.layers.end],
                            predicted_ms: Some(s.stage_time_ms),
                            predicted_hop_ms: s.hop.as_ref().map(|h| h.time_ms),
                            weight_bytes: Some(s.weight_bytes),
                            memory_budget_bytes: Some(s.memory_budget_bytes),
                            ..StageView::default()
                        })
                        .collect();
                    v.info.plan = Some(named_plan);
                    v.info.predicted_tokens_per_s = Some(plan.tokens_per_s);
                });
                self.plan = Some(plan);
                self.plan_connections = connections;
                self.whole_model_local = false;
                self.first_split_done = true;
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "cannot start the cluster pipeline"),
        }
    }

    async fn build_pipeline(&mut self, plan: &Plan) -> Result<Box<dyn Pipeline>> {
        let stages = &plan.stages;
        let context_length = self.service.context_length();
        let mut head = None;
        if stages[0].node_id == COORDINATOR_NODE {
            let (path, layers, threads) = (self.model_path.clone(), stages[0].layers.clone(), self.config.threads);
            let dtype = self.config.activation_dtype;
            let runner = tokio::task::spawn_blocking(move || -> Result<StageRunner> {
                let model = ModelSlice::load(&path, layers, Backend::cpu(threads))?;
                Ok(StageRunner::new(model, context_length, ACTIVE_SEQUENCES_MAX, dtype))
            })
            .await??;
            if stages.len() == 1 {
                return Ok(Box::new(crate::pipeline::LocalPipeline::new(runner)));
            }
            head = Some(runner);
        }
        let first_remote = if head.is_some() { &stages[1] } else { &stages[0] };
        let worker = self
            .workers
            .values()
            .find(|w| w.node_id == first_remote.node_id)
            .context("the first worker stage is not connected")?;
        let downstream = Some(DataLink::new(worker.data_address, worker.node_id.clone()));
        let last_stage = stages.last().expect("a plan has stages").node_id.clone();
        let (broken_tx, broken) = mpsc::unbounded_channel();
        if let Some(old) = self.broken_route.lock().expect("route lock").replace(broken_tx) {
            let _ = old.send("replaced by a new pipeline".into());
        }
        let description = stages
            .iter()
            .map(|s| {
                let name = self.workers.values().find(|w| w.node_id == s.node_id).map_or(s.node_id.as_str(), |w| w.name.as_str());
                format!("{name} [{}..{})", s.layers.start, s.layers.end)
            })
            .collect::<Vec<_>>()
            .join(" → ");
        Ok(Box::new(ClusterPipeline {
            head,
            depth: stages.len(),
            data: self.data.clone(),
            downstream,
            last_stage,
            broken,
            tail: None,
            local_errors: Default::default(),
            description,
        }))
    }

    /// Copies membership into the shared view.
    fn publish(&self) {
        let now = self.now_ms();
        let snapshot = self.membership.snapshot(now);
        let sent = self.weights.bytes_sent();
        self.status.update(|v| {
            v.info.weight_bytes_sent = sent;
            let nodes = snapshot
                .iter()
                .map(|n| {
                    let worker = self.workers.values().find(|w| w.node_id == n.node_id);
                    let device = self.membership.members().find(|(id, _)| *id == n.node_id).map(|(_, d)| d);
                    let stage = v.stages.iter().find(|s| s.node_id == n.node_id);
                    NodeView {
                        node_id: n.node_id.clone(),
                        name: n.name.clone(),
                        state: match &n.state {
                            NodeState::Joining => "joining".into(),
                            NodeState::Loading { bytes_done, bytes_total } => {
                                format!("loading {}%", if *bytes_total == 0 { 100 } else { bytes_done * 100 / bytes_total })
                            }
                            NodeState::Ready => "ready".into(),
                            NodeState::Gone { reason, .. } => format!("gone ({reason:?})"),
                        },
                        address: worker.map_or_else(String::new, |w| w.connection.remote_address().to_string()),
                        data_address: worker.map_or_else(String::new, |w| w.data_address.to_string()),
                        memory_budget_bytes: device.map_or(0, |d| d.memory_budget_bytes),
                        last_seen_age_ms: n.last_seen_age_ms,
                        steps: n.stats.as_ref().map_or(0, |s| s.steps),
                        busy_us: n.stats.as_ref().map_or(0, |s| s.busy_us),
                        step_ms: n.step_ms,
                        backend: device.map_or_else(String::new, |d| d.backend.clone()),
                        threads: device.map_or(0, |d| d.threads),
                        kv_bytes: n.stats.as_ref().map_or(0, |s| s.kv_bytes),
                        weight_bytes: stage.and_then(|s| s.weight_bytes).unwrap_or(0),
                        layers: stage.map(|s| s.layers),
                        hop_rtt_us: n.stats.as_ref().map(|s| s.next_hop_rtt_us).filter(|&us| us > 0),
                        resident_bytes: n.stats.as_ref().map(|s| s.resident_bytes).filter(|&b| b > 0),
                        peak_resident_bytes: n.stats.as_ref().map(|s| s.peak_resident_bytes).filter(|&b| b > 0),
                        ..NodeView::default()
                    }
                })
                .collect();
            v.nodes = nodes;
        });
    }
}

fn stages_of(plan: &Plan) -> Vec<(String, u32, u32)> {
    plan.stages.iter().map(|s| (s.node_id.clone(), s.layers.start, s.layers.end)).collect()
}

/// Stage 0 here or on a worker, the rest on workers. The generation thread writes the first
/// worker's stream and reads the last stage's stream itself, on the data plane's runtime
/// (which only it drives): no thread hand-off on the way out or back, which a token would
/// pay at every step.
pub struct ClusterPipeline {
    head: Option<StageRunner>,
    /// Its stages: steps kept in flight at once.
    depth: usize,
    data: Arc<DataPlane>,
    /// To the first worker stage, dialled on the first send; `None` once a send failed (the
    /// pipeline is broken: the next one replaces it).
    downstream: Option<DataLink>,
    /// The node whose data streams carry this pipeline's sampled tokens.
    last_stage: String,
    /// A reason, when the driver finds the pipeline broken (a stage left).
    broken: mpsc::UnboundedReceiver<String>,
    tail: Option<DataStream>,
    local_errors: std::collections::VecDeque<PipelineError>,
    description: String,
}

impl Pipeline for ClusterPipeline {
    fn send(&mut self, message: Message) -> Result<(), PipelineError> {
        let is_step = matches!(message, Message::StepTokens(_));
        let out = match &mut self.head {
            Some(head) => match head.handle(message) {
                Ok(Some(out)) => out,
                Ok(None) => return Ok(()),
                Err(e) if is_step => {
                    self.local_errors.push_back(PipelineError::Step(e.to_string()));
                    return Ok(());
                }
                Err(e) => return Err(PipelineError::Step(e.to_string())),
            },
            None => message,
        };
        let Some(link) = self.downstream.as_mut() else {
            return Err(PipelineError::Broken("the link to the first worker stage failed earlier".into()));
        };
        // (A ReleaseSequence is sent with no recv after it: `DataLink::send` puts the frame
        // on the wire before it returns, as nothing drives this runtime between requests.)
        let data = &self.data;
        data.block_on(link.send(&data.endpoint, &data.identity, &out)).map_err(|e| {
            self.downstream = None;
            PipelineError::Broken(format!("{e:#}"))
        })
    }

    fn recv(&mut self, timeout: Duration) -> Result<SampledTokens, PipelineError> {
        if let Some(e) = self.local_errors.pop_front() {
            return Err(e);
        }
        let mut streams = self.data.streams.lock().expect("streams lock");
        let (broken, tail, last_stage) = (&mut self.broken, &mut self.tail, &self.last_stage);
        let wait = async {
            loop {
                let current = async {
                    match tail.as_mut() {
                        Some(stream) => stream.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    reason = broken.recv() => {
                        return Err(PipelineError::Broken(reason.unwrap_or_else(|| "the cluster stopped".into())));
                    }
                    stream = streams.recv() => match stream {
                        Some(stream) if stream.peer() == last_stage => *tail = Some(stream),
                        // A stage of an earlier pipeline still finishing a stream.
                        Some(stream) => tracing::debug!(peer = stream.peer(), "a data stream from a node that is not the last stage; dropped"),
                        None => return Err(PipelineError::Broken("the cluster stopped".into())),
                    },
                    message = current => match message {
                        Ok(Some(Message::SampledTokens(sampled))) => return Ok(sampled),
                        Ok(Some(other)) => tracing::warn!(kind = ?other.kind(), "unexpected message from the last stage"),
                        Ok(None) => *tail = None,
                        Err(e) => {
                            // `DataStream::recv` has closed that connection.
                            *tail = None;
                            return Err(PipelineError::Broken(format!("bad data stream from the last stage: {e}")));
                        }
                    },
                }
            }
        };
        match self.data.block_on(async { tokio::time::timeout(timeout, wait).await }) {
            Ok(result) => result,
            Err(_) => Err(PipelineError::Timeout(timeout)),
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn local_stage(&self) -> Option<crate::pipeline::LocalStage> {
        let head = self.head.as_ref()?;
        Some(crate::pipeline::LocalStage {
            counters: head.counters(),
            next_hop_rtt: self.downstream.as_ref().and_then(DataLink::rtt),
        })
    }
}
