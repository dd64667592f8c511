//! `worker join`: find the coordinator, prove the join token, receive an assignment, fetch
//! the slice's weights into the cache, and run the stage until told to stop.
//!
//! Two planes, each with its own QUIC endpoint (see `net::tls::Plane`):
//!
//! * **control**, on the process's multi-threaded runtime: the **control loop** reads the
//!   coordinator's control stream (Assignment, Shutdown); a **control writer** owns that
//!   stream's send half, and the heartbeat ticker and the loader queue messages to it;
//! * **data**, on the **stage thread** ([`StageThread`]), which owns a current-thread runtime
//!   and the data endpoint (the `--listen` port). Between assignments it only drives the
//!   endpoint; with a stage, it reads the next message from its input stream, runs
//!   [`StageRunner::handle`], and writes the output to the next stage's data endpoint (the
//!   coordinator's, on the last stage) itself: a token crosses no thread inside a worker.
//!   Its **acceptor** task keeps only connections from the coordinator and the upstream
//!   stage (identities proven by TLS); a **reader** task per data stream decodes its frames
//!   into the stage's inbox (same thread: no wake-up), and closes the connection, with the
//!   reason logged, on the first frame that breaks the protocol. Other streams, and the
//!   stage, go on.

use potluck_protocol::close;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_protocol::{
    Assignment, DeviceSummary, Heartbeat, Hello, LoadProgress, Message, StageStats, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;

use potluck_node::net::framed::{FrameReader, FrameWriter};
use potluck_node::net::identity::NodeIdentity;
use potluck_node::net::token::{proofs_equal, JoinToken};
use potluck_node::net::tls::Plane;
use potluck_node::net::{data, discovery, tls};
use potluck_node::net::data::{DataLink, DataStream};
use potluck_node::weights::slice_cache::{CachedSliceSource, SliceCache};
use potluck_node::stage::{StageCounters, StageRunner};
use potluck_node::weights::fetch::fetch_slice;
use potluck_node::weights::local::{LocalCheck, LocalModels, LocalSliceSource};

/// How long the coordinator has to answer Hello.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// LoadProgress messages at most this often while fetching a slice.
pub const LOAD_PROGRESS_INTERVAL_MS: u64 = 250;

#[derive(Clone)]
pub struct JoinConfig {
    /// `None`: find the coordinator by mDNS.
    pub coordinator: Option<SocketAddr>,
    pub token: JoinToken,
    pub name: String,
    pub identity: NodeIdentity,
    pub cache_dir: PathBuf,
    /// Where this worker's QUIC endpoint listens (other stages dial it).
    pub listen: SocketAddr,
    pub threads: usize,
    pub device: DeviceSummary,
    /// The worker's own copy of the model (`--model`), if it has one: slices it holds are
    /// read from it instead of fetched.
    pub local_models: Option<Arc<LocalModels>>,
}

/// How a joined worker's session ended.
#[derive(Debug)]
pub enum JoinOutcome {
    /// The coordinator sent Shutdown.
    Shutdown,
    /// The connection to the coordinator ended: the reason.
    Disconnected(String),
    /// Ctrl-C (or the caller's shutdown future).
    Interrupted,
    /// The coordinator refused this worker (a wrong token, a duplicate node id, …): the
    /// reason it gave. Trying again would be refused again.
    Refused(String),
}

/// Decoded messages for the running stage. Bounded, so a peer that sends faster than the
/// stage computes is held back by QUIC flow control, not buffered here.
type StageInbox = mpsc::Sender<Message>;

/// Messages waiting for the stage at most (then the stream's reader waits).
pub const STAGE_INBOX_MESSAGES_MAX: usize = 64;

/// Joins and serves until the coordinator shuts us down, the connection drops, or
/// `shutdown` resolves.
pub async fn join(config: JoinConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<JoinOutcome> {
    tls::install_crypto_provider();
    let identity = Arc::new(config.identity);
    // Who may open data connections to us: the coordinator, and the upstream stage once assigned.
    let allowed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let inbox: Arc<Mutex<Option<StageInbox>>> = Arc::new(Mutex::new(None));
    let data = StageThread::start(identity.clone(), config.listen, allowed.clone(), inbox.clone()).await?;
    let endpoint = tls::endpoint(&identity, SocketAddr::new(config.listen.ip(), 0))
        .context("cannot open this worker's control endpoint")?;
    let node_id = identity.node_id();
    println!("worker: node id {node_id}, data endpoint on {} (QUIC)", data.local_addr);

    let (connection, coordinator_id) = find_and_connect(&endpoint, &identity, config.coordinator).await?;
    let coordinator_addr = connection.remote_address();
    let (send, recv) = connection.open_bi().await.context("cannot open the control stream")?;
    let mut control_out = FrameWriter::new(send);
    let mut control_in = FrameReader::new(recv);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: node_id.clone(),
        name: config.name.clone(),
        token_proof: config.token.worker_proof(&coordinator_id, &node_id),
        device: config.device.clone(),
        data_port: data.local_addr.port(),
    };
    control_out.send(&Message::Hello(hello)).await?;
    let reply = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), control_in.recv())
        .await
        .map_err(|_| anyhow!("the coordinator at {coordinator_addr} did not answer within {HANDSHAKE_TIMEOUT_MS} ms"))??;
    let heartbeat_ms = match reply {
        Some(Message::Welcome(welcome)) => {
            let expected = config.token.coordinator_proof(&coordinator_id, &node_id);
            if !proofs_equal(&welcome.token_proof, &expected) {
                connection.close(close::COORDINATOR_PROOF_FAILED.into(), b"coordinator failed the token proof");
                bail!(
                    "the coordinator at {coordinator_addr} ({coordinator_id}) could not prove it knows the join token; \
                     refusing to work for it (is another potluck cluster on this network?)"
                );
            }
            welcome.heartbeat_interval_ms
        }
        Some(Message::Refused(refused)) => {
            return Ok(JoinOutcome::Refused(format!("{:?}: {}", refused.code, refused.reason)));
        }
        Some(other) => bail!("the coordinator answered Hello with {:?}", other.kind()),
        None => bail!("the coordinator closed the connection during the handshake"),
    };
    println!("worker: joined the cluster of coordinator {coordinator_id} at {coordinator_addr}");

    // Control writer.
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(message) = control_rx.recv().await {
            if let Err(e) = control_out.send(&message).await {
                tracing::warn!(error = %e, "cannot write to the coordinator");
                break;
            }
        }
        let _ = control_out.get_mut().finish();
    });

    // Counters shared with the heartbeat.
    let counters = Arc::new(SharedCounters::default());
    {
        let (control_tx, counters) = (control_tx.clone(), counters.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms)));
            loop {
                tick.tick().await;
                let beat = Heartbeat { now_ms: started.elapsed().as_millis() as u64, stats: counters.stats() };
                if control_tx.send(Message::Heartbeat(beat)).is_err() {
                    break;
                }
            }
        });
    }

    allowed.lock().expect("allowed lock").insert(coordinator_id.clone());
    let coordinator_id_for_session = coordinator_id.clone();

    let cache = SliceCache::open(config.cache_dir.clone())
        .with_context(|| format!("cannot open the slice cache at {}", config.cache_dir.display()))?;
    let mut session = Session {
        coordinator_id: coordinator_id_for_session,
        endpoint,
        connection: connection.clone(),
        control_tx,
        allowed,
        inbox,
        counters,
        cache,
        local_models: config.local_models.clone(),
        threads: config.threads,
        data,
        stage_stop: None,
        stage_done: None,
    };
    let outcome = tokio::select! {
        outcome = session.control_loop(&mut control_in) => outcome,
        () = shutdown => JoinOutcome::Interrupted,
    };
    session.stop_stage();
    let reason: &[u8] = match outcome {
        JoinOutcome::Interrupted => b"worker interrupted",
        _ => b"worker leaving",
    };
    connection.close(close::LEAVING.into(), reason);
    session.data.stop().await;
    session.endpoint.wait_idle().await;
    Ok(outcome)
}

/// Dials the coordinator: the given address, or each one mDNS finds until one answers.
async fn find_and_connect(
    endpoint: &quinn::Endpoint,
    identity: &NodeIdentity,
    address: Option<SocketAddr>,
) -> Result<(quinn::Connection, String)> {
    if let Some(address) = address {
        let connection = tls::connect(endpoint, identity, address, None).await?;
        let id = tls::peer_node_id(&connection)?;
        return Ok((connection, id));
    }
    println!("worker: looking for a coordinator on the local network (mDNS)...");
    let found = discovery::discover(Duration::from_millis(discovery::DISCOVERY_TIMEOUT_MS)).await?;
    if found.is_empty() {
        bail!(
            "no coordinator answered on the local network within {} ms; give its address with --coordinator HOST:PORT \
             (multicast may be blocked between these machines)",
            discovery::DISCOVERY_TIMEOUT_MS
        );
    }
    let mut errors = Vec::new();
    for node in &found {
        for address in &node.addresses {
            match tls::connect(endpoint, identity, *address, Some(&node.node_id)).await {
                Ok(connection) => {
                    println!("worker: found coordinator {} at {address}", node.node_id);
                    return Ok((connection, node.node_id.clone()));
                }
                Err(e) => errors.push(format!("{address}: {e:#}")),
            }
        }
    }
    bail!("mDNS found {} node(s) but none answered as a potluck coordinator: {}", found.len(), errors.join("; "))
}

#[derive(Default)]
struct SharedCounters {
    steps: AtomicU64,
    rows: AtomicU64,
    busy_us: AtomicU64,
    kv_bytes: AtomicU64,
    next_hop_rtt_us: AtomicU64,
}

impl SharedCounters {
    fn stats(&self) -> StageStats {
        let resident = potluck_node::resident::resident().unwrap_or_default();
        StageStats {
            steps: self.steps.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            busy_us: self.busy_us.load(Ordering::Relaxed),
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed),
            next_hop_rtt_us: self.next_hop_rtt_us.load(Ordering::Relaxed),
            resident_bytes: resident.now_bytes,
            peak_resident_bytes: resident.peak_bytes,
        }
    }

    fn store(&self, c: StageCounters, kv_bytes: u64) {
        self.steps.store(c.steps, Ordering::Relaxed);
        self.rows.store(c.rows, Ordering::Relaxed);
        self.busy_us.store(c.busy_us, Ordering::Relaxed);
        self.kv_bytes.store(kv_bytes, Ordering::Relaxed);
    }
}

struct Session {
    coordinator_id: String,
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    control_tx: mpsc::UnboundedSender<Message>,
    allowed: Arc<Mutex<HashSet<String>>>,
    inbox: Arc<Mutex<Option<StageInbox>>>,
    counters: Arc<SharedCounters>,
    cache: SliceCache,
    local_models: Option<Arc<LocalModels>>,
    threads: usize,
    data: StageThread,
    /// Stops the running stage (after the message it is on)…
    stage_stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// …and says when it has.
    stage_done: Option<std::sync::mpsc::Receiver<()>>,
}

impl Session {
    async fn control_loop(&mut self, control_in: &mut FrameReader<quinn::RecvStream>) -> JoinOutcome {
        loop {
            let message = match control_in.recv().await {
                Ok(Some(m)) => m,
                Ok(None) => return JoinOutcome::Disconnected("the coordinator closed the control stream".into()),
                Err(e) => {
                    let reason = self
                        .connection
                        .close_reason()
                        .map_or_else(|| e.to_string(), |r| format!("connection closed: {r}"));
                    return JoinOutcome::Disconnected(reason);
                }
            };
            match message {
                Message::Assignment(assignment) => {
                    if let Err(e) = self.take_assignment(assignment).await {
                        eprintln!("worker: cannot take the assignment: {e:#}");
                        tracing::error!(error = format!("{e:#}"), "assignment failed");
                        return JoinOutcome::Disconnected(format!("assignment failed: {e:#}"));
                    }
                }
                Message::Shutdown => return JoinOutcome::Shutdown,
                Message::ReleaseSequence(_) | Message::Heartbeat(_) => {}
                other => tracing::warn!(kind = ?other.kind(), "unexpected message on the control stream; ignored"),
            }
        }
    }

    fn stop_stage(&mut self) {
        // Streams accepted from now on have no stage to feed; the stage ends after the
        // message it is on.
        self.inbox.lock().expect("inbox lock").take();
        drop(self.stage_stop.take());
        if let Some(done) = self.stage_done.take() {
            let _ = done.recv();
        }
    }

    /// Loads a slice verified in the worker's own model file (blocking work on a blocking
    /// thread: reads and repacks the weights).
    async fn load_local(&self, profile: ModelProfile, layers: std::ops::Range<u32>, mut source: LocalSliceSource) -> Result<ModelSlice> {
        let threads = self.threads;
        tokio::task::spawn_blocking(move || -> Result<ModelSlice> {
            Ok(ModelSlice::from_source(profile, layers, &mut source, Backend::cpu(threads))?)
        })
        .await?
    }

    /// Fetches what the slice cache lacks (a progress bar here, LoadProgress to the
    /// coordinator), then loads the slice from the cache.
    async fn fetch_and_load(
        &self,
        a: &Assignment,
        profile: ModelProfile,
        layers: std::ops::Range<u32>,
        total: u64,
        started: Instant,
    ) -> Result<ModelSlice> {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("worker: loading slice [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut last_sent = Instant::now() - Duration::from_millis(LOAD_PROGRESS_INTERVAL_MS);
        let control_tx = self.control_tx.clone();
        let connection = self.connection.clone();
        let mut progress = |done: u64, all: u64| {
            bar.set_position(done);
            if last_sent.elapsed() >= Duration::from_millis(LOAD_PROGRESS_INTERVAL_MS) || done == all {
                last_sent = Instant::now();
                let _ = control_tx.send(Message::LoadProgress(LoadProgress { bytes_done: done.min(all), bytes_total: all }));
            }
        };
        let report = fetch_slice(
            &self.cache,
            a.model_hash,
            &a.tensors,
            || {
                let connection = connection.clone();
                async move {
                    let (send, recv) = connection.open_bi().await.context("cannot open a weight stream")?;
                    Ok((FrameWriter::new(send), FrameReader::new(recv)))
                }
            },
            &mut progress,
        )
        .await?;
        bar.finish_and_clear();
        println!(
            "worker: slice ready in {:.1} s: {:.1} MiB from the cache, {:.1} MiB received{}",
            started.elapsed().as_secs_f64(),
            report.bytes_from_cache as f64 / (1u64 << 20) as f64,
            report.bytes_fetched as f64 / (1u64 << 20) as f64,
            if report.chunks_refetched > 0 { format!(", {} corrupt chunk(s) fetched again", report.chunks_refetched) } else { String::new() }
        );

        // Load the layers from the cache (blocking: reads and repacks the weights).
        let cache_root = self.cache.root().to_path_buf();
        let (hash, tensors) = (a.model_hash, a.tensors.clone());
        let threads = self.threads;
        tokio::task::spawn_blocking(move || -> Result<ModelSlice> {
            let cache = SliceCache::open(cache_root)?;
            let mut source = CachedSliceSource::new(cache, hash, &tensors);
            Ok(ModelSlice::from_source(profile, layers, &mut source, Backend::cpu(threads))?)
        })
        .await?
    }

    async fn take_assignment(&mut self, a: Assignment) -> Result<()> {
        self.stop_stage();
        let layers = a.layer_start..a.layer_end;
        let total: u64 = a.tensors.iter().map(|t| t.bytes).sum();
        println!(
            "worker: assigned layers {}..{} of {} (stage {} of {}), {} tensors, {:.1} MiB{}",
            a.layer_start,
            a.layer_end,
            a.n_layers,
            a.stage_index + 1,
            a.n_stages,
            a.tensors.len(),
            total as f64 / (1u64 << 20) as f64,
            if a.layer_end == a.n_layers {
                ", last stage: samples and answers the coordinator".to_string()
            } else {
                format!(", then to the next stage at {}", a.next_stage.as_deref().unwrap_or("?"))
            }
        );
        let profile: ModelProfile =
            serde_json::from_str(&a.model_profile).context("the assignment's model profile is not valid")?;
        if profile.n_layers != a.n_layers {
            bail!("the assignment's model profile has {} layers, the assignment says {}", profile.n_layers, a.n_layers);
        }
        {
            let mut allowed = self.allowed.lock().expect("allowed lock");
            allowed.retain(|id| *id == self.coordinator_id);
            allowed.insert(a.upstream_id.clone());
        }

        let started = Instant::now();
        // The worker's own copy of the model, when it has one and it holds this slice.
        let local = match &self.local_models {
            Some(models) => {
                println!("worker: checking the slice against the model file(s) given with --model...");
                let (models, check_profile, check_layers, hash, refs) =
                    (models.clone(), profile.clone(), layers.clone(), a.model_hash, a.tensors.clone());
                match tokio::task::spawn_blocking(move || models.check(&hash, &check_profile, check_layers, &refs)).await? {
                    LocalCheck::Verified { source, path, tensors_hashed } => {
                        let checked = if tensors_hashed == 0 {
                            "every tensor's hash was known from the hash store: none read to check it".to_string()
                        } else {
                            format!("{tensors_hashed} tensor(s) hashed to check it, remembered for the next start")
                        };
                        println!("worker: the slice is in {}: reading it from disk, nothing over the network ({checked})", path.display());
                        let _ = self.control_tx.send(Message::LoadProgress(LoadProgress { bytes_done: total, bytes_total: total }));
                        Some(source)
                    }
                    LocalCheck::NotThisModel(why) => {
                        println!("worker: --model not used for this slice: {why}; fetching it from the coordinator instead");
                        tracing::warn!(reason = %why, "the local model file is not the coordinator's model");
                        None
                    }
                }
            }
            None => None,
        };
        let model = match local {
            Some(source) => self.load_local(profile, layers, source).await?,
            None => self.fetch_and_load(&a, profile, layers, total, started).await?,
        };
        println!("worker: slice loaded in {:.1} s", started.elapsed().as_secs_f64());
        let runner = StageRunner::new(
            model,
            a.context_length as usize,
            a.sequences_max as usize,
            a.activation_dtype,
        );

        // Downstream: the next stage's data endpoint, or the coordinator's (dialled, its
        // identity checked).
        let (Some(address), Some(node_id)) = (&a.next_stage, &a.next_stage_id) else {
            bail!("the assignment names no data endpoint for this stage's output (a coordinator of another version?)");
        };
        let mut address: SocketAddr = address.parse().with_context(|| format!("bad next-stage address {address:?}"))?;
        if address.ip().is_unspecified() {
            address.set_ip(self.connection.remote_address().ip());
        }
        let (inbox_tx, inbox_rx) = mpsc::channel(STAGE_INBOX_MESSAGES_MAX);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let job = StageJob {
            runner,
            downstream: DataLink::new(address, node_id.clone()),
            messages: inbox_rx,
            stop: stop_rx,
            counters: self.counters.clone(),
            done: done_tx,
        };
        let jobs = self.data.jobs.as_ref().ok_or_else(|| anyhow!("the stage thread has stopped"))?;
        jobs.send(job).map_err(|_| anyhow!("the stage thread has stopped"))?;
        self.stage_stop = Some(stop_tx);
        self.stage_done = Some(done_rx);
        *self.inbox.lock().expect("inbox lock") = Some(inbox_tx);
        self.control_tx.send(Message::Ready).map_err(|_| anyhow!("the control stream closed"))?;
        println!("worker: ready");
        Ok(())
    }
}

/// The worker's stage thread: its current-thread runtime and the data
/// endpoint it drives.
struct StageThread {
    local_addr: SocketAddr,
    /// `None` once stopped.
    jobs: Option<mpsc::UnboundedSender<StageJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A stage for the stage thread to run until `stop` fires (or its sender is dropped).
struct StageJob {
    runner: StageRunner,
    downstream: DataLink,
    messages: mpsc::Receiver<Message>,
    stop: tokio::sync::oneshot::Receiver<()>,
    counters: Arc<SharedCounters>,
    done: std::sync::mpsc::Sender<()>,
}

impl StageThread {
    /// Starts the stage thread and binds the data endpoint on `listen`.
    async fn start(
        identity: Arc<NodeIdentity>,
        listen: SocketAddr,
        allowed: Arc<Mutex<HashSet<String>>>,
        inbox: Arc<Mutex<Option<StageInbox>>>,
    ) -> Result<Self> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<SocketAddr>>();
        let (jobs, mut jobs_rx) = mpsc::unbounded_channel::<StageJob>();
        let thread = std::thread::Builder::new()
            .name("potluck-stage".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => return drop(ready_tx.send(Err(anyhow!("cannot start the stage thread's runtime: {e}")))),
                };
                let endpoint = {
                    let _context = runtime.enter();
                    tls::endpoint_for(Plane::Data, &identity, listen)
                        .with_context(|| format!("cannot open this worker's data endpoint on {listen} (is the port in use?)"))
                };
                let endpoint = match endpoint.and_then(|e| Ok((e.local_addr()?, e))) {
                    Ok((address, endpoint)) => {
                        let _ = ready_tx.send(Ok(address));
                        endpoint
                    }
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                // Each stream feeds the stage running when it arrived; a stage that replaces
                // it gets the streams opened after it started.
                let on_stream = move |stream: DataStream| match inbox.lock().expect("inbox lock").clone() {
                    Some(inbox) => drop(tokio::spawn(read_data_stream(stream, inbox))),
                    None => tracing::warn!(peer = stream.peer(), "a data stream arrived before the stage was ready; ignored"),
                };
                let is_member = move |peer: &str| allowed.lock().expect("allowed lock").contains(peer);
                runtime.spawn(data::accept_members(endpoint.clone(), is_member, on_stream));
                while let Some(job) = runtime.block_on(jobs_rx.recv()) {
                    let io = StageIo {
                        runtime: &runtime,
                        endpoint: endpoint.clone(),
                        identity: identity.clone(),
                        downstream: job.downstream,
                        messages: job.messages,
                        stop: job.stop,
                    };
                    run_stage(job.runner, io, &job.counters);
                    let _ = job.done.send(());
                }
                endpoint.close(close::LEAVING.into(), b"worker leaving");
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
                });
            })
            .context("cannot start the stage thread")?;
        let local_addr = ready_rx.await.map_err(|_| anyhow!("the stage thread stopped while starting"))??;
        Ok(Self { local_addr, jobs: Some(jobs), thread: Some(thread) })
    }

    /// Ends the stage thread (after any stage was stopped) and waits for it.
    async fn stop(&mut self) {
        self.jobs = None; // the stage thread's loop ends
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The stage thread's I/O: it reads its input stream and writes its output stream itself,
/// on the runtime it alone drives, so a step crosses no thread on its way in or out.
struct StageIo<'a> {
    runtime: &'a tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    identity: Arc<NodeIdentity>,
    downstream: DataLink,
    /// What the reader tasks decoded from the input streams, in arrival order.
    messages: mpsc::Receiver<Message>,
    stop: tokio::sync::oneshot::Receiver<()>,
}

impl StageIo<'_> {
    /// The next message for the stage; `None` when the stage is stopped.
    fn next(&mut self) -> Option<Message> {
        let (runtime, messages, stop) = (self.runtime, &mut self.messages, &mut self.stop);
        runtime.block_on(async {
            tokio::select! {
                biased;
                _ = stop => None,
                message = messages.recv() => message,
            }
        })
    }

    /// Sends `message` downstream, dialling the next stage the first time.
    fn send(&mut self, message: &Message) -> Result<()> {
        let (endpoint, identity) = (&self.endpoint, &self.identity);
        self.runtime.block_on(self.downstream.send(endpoint, identity, message))
    }
}

fn run_stage(mut runner: StageRunner, mut io: StageIo<'_>, counters: &SharedCounters) {
    while let Some(message) = io.next() {
        let kind = message.kind();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.handle(message)));
        match result {
            Ok(Ok(Some(output))) => {
                if let Err(e) = io.send(&output) {
                    tracing::error!(error = format!("{e:#}"), "cannot send a step downstream");
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(?kind, error = %e, "the stage refused a message"),
            Err(_) => tracing::error!(?kind, "the stage panicked on a message; it goes on with the next"),
        }
        counters.store(runner.counters(), runner.kv_bytes());
        if let Some(rtt) = io.downstream.rtt() {
            counters.next_hop_rtt_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
        }
    }
    io.downstream.finish();
}

/// Decodes one data stream into the stage's inbox until it ends, breaks the protocol (then
/// [`DataStream::recv`] has closed its connection) or the stage stops.
async fn read_data_stream(mut stream: DataStream, inbox: StageInbox) {
    while let Ok(Some(message)) = stream.recv().await {
        if inbox.send(message).await.is_err() {
            return; // that stage has stopped
        }
    }
}
