//! Control messages: the handshake, the assignment of a layer range, loading, liveness and
//! shutdown. They travel on a node's control stream, apart from the data (TigerBeetle: keep
//! control traffic apart from data traffic), so a 30 MiB activation frame never delays a
//! heartbeat.
//!
//! Handshake (coordinator ⇄ worker, on the control stream the worker opens):
//!
//! ```text
//! worker ── Hello ──▶ coordinator
//! worker ◀── Welcome | Refused ── coordinator
//! worker ◀── Assignment ── coordinator
//! worker ◀── WeightChunk… (data stream) ── coordinator
//! worker ── LoadProgress… , Ready ──▶ coordinator
//! worker ── Heartbeat (every Welcome::heartbeat_interval_ms) ──▶ coordinator
//! worker ◀── ReleaseSequence… , Shutdown ── coordinator
//! ```

use rkyv::{Archive, Deserialize, Serialize};

use crate::check::{check_finite_non_negative, check_len, check_name};
use crate::limits::{
    ADDRESS_BYTES_MAX, HEARTBEAT_INTERVAL_MS_MAX, HEARTBEAT_INTERVAL_MS_MIN, LAYERS_MAX, NAME_BYTES_MAX,
    MODEL_PROFILE_BYTES_MAX, REASON_BYTES_MAX, SEGMENTS_MAX, SEQUENCE_POSITIONS_MAX, TENSORS_PER_ASSIGNMENT_MAX,
    TENSOR_BYTES_MAX, TENSOR_DIMS_MAX,
};
use crate::{ProtocolError, PROTOCOL_VERSION};

/// Domain-separation label at the start of every join-token proof (see
/// [`Hello::token_proof`]).
pub const JOIN_CHALLENGE_LABEL: &[u8] = b"potluck join v1";

/// The first message a worker sends: who it is, what it can do, and proof that it holds the
/// join token.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    /// The version the worker speaks; must equal the frame header's version (and so ours).
    pub protocol_version: u16,
    /// Stable identity of the node (survives restarts; the coordinator keys membership on
    /// it). Non-empty, at most [`NAME_BYTES_MAX`] bytes.
    pub node_id: String,
    /// Name shown on the dashboard (the host name by default); at most [`NAME_BYTES_MAX`].
    pub name: String,
    /// HMAC-SHA256 keyed with the join token over [`JOIN_CHALLENGE_LABEL`], the role
    /// ("worker"), the coordinator's node id and this node's id, each length-prefixed. Both
    /// ids are proven by the connection's TLS certificates, so a captured proof is useless to
    /// any other pair of nodes, and the token itself never travels. Computing and checking it
    /// is the drivers' job (`worker/src/net/token.rs`; this crate has no crypto).
    pub token_proof: [u8; 32],
    /// What the node measured about itself; the shard planner's input.
    pub device: DeviceSummary,
    /// UDP port of the node's data endpoint, where the previous stage dials it (on the IP
    /// address this connection comes from). The control connection uses an endpoint of its
    /// own, so the port differs from this connection's. Non-zero.
    pub data_port: u16,
}

/// A node's measured profile, as the shard planner consumes it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceSummary {
    /// Compute backend (`"cpu"`, `"cuda"`, `"metal"`); non-empty, at most [`NAME_BYTES_MAX`].
    pub backend: String,
    /// Memory the node lends for weights and KV cache.
    pub memory_budget_bytes: u64,
    /// Measured memory bandwidth; finite and ≥ 0 (a NaN would poison the planner).
    pub memory_bandwidth_bytes_per_s: f64,
    /// Measured quantized mat-vec throughput (decode, weights in cache) in FLOP/s; finite and ≥ 0.
    pub matmul_flops_per_s: f64,
    /// Compute threads the node will use; at least 1.
    pub threads: u32,
}

/// The coordinator accepts the worker.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Welcome {
    /// The coordinator's proof that it knows the join token too
    /// (HMAC-SHA256 over [`JOIN_CHALLENGE_LABEL`], "coordinator", both node ids), so a worker
    /// never hands its compute to a coordinator that merely answered on the right port.
    pub token_proof: [u8; 32],
    /// How often the worker must send a [`Heartbeat`]; the coordinator owns the silence
    /// timeout, so it also sets the interval. In
    /// [`HEARTBEAT_INTERVAL_MS_MIN`]`..=`[`HEARTBEAT_INTERVAL_MS_MAX`].
    pub heartbeat_interval_ms: u32,
}

/// Why a worker was turned away; lets the worker decide whether retrying can help.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// The worker speaks another protocol version: upgrade, don't retry.
    UnsupportedVersion,
    /// The token proof did not verify: wrong join token, don't retry.
    BadToken,
    /// A node with this `node_id` is already connected.
    DuplicateNodeId,
    /// The cluster has no use for the node now (e.g. the model already fits elsewhere);
    /// retrying later may help.
    NotNeeded,
    /// Anything else; the reason says what.
    Other,
}

/// The coordinator turns the worker away and closes the connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Refused {
    pub code: RefusalCode,
    /// Human-readable reason, shown by the worker; at most [`REASON_BYTES_MAX`] bytes.
    pub reason: String,
}

/// The layer range a worker is to serve, and the tensors it needs for it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Assignment {
    /// SHA-256 identifying the model file, so a worker can reuse a cached slice.
    pub model_hash: [u8; 32],
    /// First block of the range (inclusive).
    pub layer_start: u32,
    /// End of the range (exclusive); `layer_start < layer_end <= n_layers`.
    pub layer_end: u32,
    /// Blocks in the whole model; 1..=[`LAYERS_MAX`]. `layer_start == 0` means this stage
    /// embeds, `layer_end == n_layers` that it holds the head and samples.
    pub n_layers: u32,
    /// Address (`host:port`) of the data endpoint that receives this stage's output: the
    /// next stage's, or on the last stage the coordinator's (where it sends
    /// [`crate::SampledTokens`]). Non-empty, at most [`ADDRESS_BYTES_MAX`] bytes. `None` only
    /// from a coordinator that does not take data connections; a worker refuses such an
    /// assignment.
    pub next_stage: Option<String>,
    /// The tensors of the slice, in the order [`crate::WeightChunk::tensor_index`] refers
    /// to them; at most [`TENSORS_PER_ASSIGNMENT_MAX`].
    pub tensors: Vec<TensorRef>,
    /// The node that feeds this stage its input (the coordinator for stage 0): the only
    /// peer besides the coordinator whose data connection the worker accepts.
    pub upstream_id: String,
    /// The node id behind `next_stage` (its certificate must prove it): the next stage's, or
    /// the coordinator's on the last stage.
    pub next_stage_id: Option<String>,
    /// Position of this stage in the pipeline, and the pipeline's length.
    pub stage_index: u32,
    pub n_stages: u32,
    /// Tokens one sequence may hold (prompt + completion): sizes each KV cache.
    pub context_length: u32,
    /// Sequences decoded at once at most (bounds the KV memory the plan budgeted).
    pub sequences_max: u32,
    /// Element type of the activations this stage sends on.
    pub activation_dtype: crate::data::Dtype,
    /// The model's hyperparameters (the engine's profile as JSON; at most
    /// [`MODEL_PROFILE_BYTES_MAX`] bytes), so a worker needs no model file.
    pub model_profile: String,
}

/// One tensor of an assigned slice.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// GGUF tensor name (`blk.3.attn_q.weight`); non-empty, at most [`NAME_BYTES_MAX`].
    pub name: String,
    /// GGML type id as stored in GGUF (`GGML_TYPE_Q4_K` = 12, …).
    pub dtype: u32,
    /// Dimensions as stored in GGUF (innermost first); 1..=[`TENSOR_DIMS_MAX`] of them.
    pub dims: Vec<u64>,
    /// Size of the tensor's data; at most [`TENSOR_BYTES_MAX`] (bounds what a worker is
    /// asked to allocate for one tensor).
    pub bytes: u64,
    /// SHA-256 of the tensor's data, checked once all its chunks have arrived.
    pub sha256: [u8; 32],
}

/// How far a worker has got with loading its slice (for the dashboard).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LoadProgress {
    /// `bytes_done <= bytes_total`.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Liveness and load, every [`Welcome::heartbeat_interval_ms`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The sender's monotonic clock in milliseconds (its own epoch): receivers use
    /// differences between heartbeats only, never compare it with their own clock.
    pub now_ms: u64,
    pub stats: StageStats,
}

/// Counters since the stage started; the coordinator takes differences for rates.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageStats {
    /// Steps the stage has run.
    pub steps: u64,
    /// Rows (tokens) it has pushed through its layers.
    pub rows: u64,
    /// Microseconds spent computing (busy / elapsed = utilisation).
    pub busy_us: u64,
    /// Bytes of KV cache held now (a gauge, not a counter).
    pub kv_bytes: u64,
    /// QUIC's smoothed round-trip estimate of the stage's link to the next node (the next
    /// stage, or the coordinator after the last), in microseconds; 0 before one exists.
    pub next_hop_rtt_us: u64,
    /// The worker process's resident memory now and its peak since it started (Linux's
    /// VmRSS and VmHWM), so budget, plan and what is really held can be shown side by side;
    /// 0 where the system does not say.
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
}

/// The sequence is finished or cancelled: every stage drops its KV cache.
/// A worker asks the coordinator for tensors of its assignment it lacks (or whose cached
/// copy failed verification), on a stream of its own; the coordinator answers on that
/// stream with their [`crate::WeightChunk`]s, in order, and then finishes the stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FetchTensors {
    /// Indices into [`Assignment::tensors`]; 1..=[`TENSORS_PER_ASSIGNMENT_MAX`] of them.
    pub tensor_indices: Vec<u32>,
}

impl FetchTensors {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.tensor_indices.is_empty() {
            return Err(ProtocolError::InvalidValue { field: "tensor_indices", reason: "empty" });
        }
        check_len("tensor_indices", self.tensor_indices.len(), TENSORS_PER_ASSIGNMENT_MAX)?;
        if self.tensor_indices.iter().any(|&i| i >= TENSORS_PER_ASSIGNMENT_MAX) {
            return Err(ProtocolError::InvalidValue { field: "tensor_indices", reason: "index over TENSORS_PER_ASSIGNMENT_MAX" });
        }
        Ok(())
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReleaseSequence {
    pub sequence_id: u64,
}

impl Hello {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: self.protocol_version, supported: PROTOCOL_VERSION });
        }
        check_name("node_id", &self.node_id, NAME_BYTES_MAX)?;
        check_len("name", self.name.len(), NAME_BYTES_MAX)?;
        if self.data_port == 0 {
            return Err(ProtocolError::InvalidValue { field: "data_port", reason: "must be a port number, not 0" });
        }
        self.device.validate()
    }
}

impl DeviceSummary {
    fn validate(&self) -> Result<(), ProtocolError> {
        check_name("backend", &self.backend, NAME_BYTES_MAX)?;
        check_finite_non_negative("memory_bandwidth_bytes_per_s", self.memory_bandwidth_bytes_per_s)?;
        check_finite_non_negative("matmul_flops_per_s", self.matmul_flops_per_s)?;
        if self.threads == 0 {
            return Err(ProtocolError::InvalidValue { field: "threads", reason: "must be at least 1" });
        }
        Ok(())
    }
}

impl Welcome {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if !(HEARTBEAT_INTERVAL_MS_MIN..=HEARTBEAT_INTERVAL_MS_MAX).contains(&self.heartbeat_interval_ms) {
            return Err(ProtocolError::InvalidValue {
                field: "heartbeat_interval_ms",
                reason: "outside HEARTBEAT_INTERVAL_MS_MIN..=HEARTBEAT_INTERVAL_MS_MAX",
            });
        }
        Ok(())
    }
}

impl Refused {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        check_len("reason", self.reason.len(), REASON_BYTES_MAX)
    }
}

impl Assignment {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.n_layers == 0 || self.n_layers > LAYERS_MAX {
            return Err(ProtocolError::InvalidValue { field: "n_layers", reason: "outside 1..=LAYERS_MAX" });
        }
        if self.layer_start >= self.layer_end || self.layer_end > self.n_layers {
            return Err(ProtocolError::InvalidValue {
                field: "layer range",
                reason: "need layer_start < layer_end <= n_layers",
            });
        }
        if let Some(address) = &self.next_stage {
            check_name("next_stage", address, ADDRESS_BYTES_MAX)?;
        }
        if self.next_stage.is_some() != self.next_stage_id.is_some() {
            return Err(ProtocolError::InvalidValue {
                field: "next_stage_id",
                reason: "a next stage needs both its address and its node id",
            });
        }
        check_name("upstream_id", &self.upstream_id, NAME_BYTES_MAX)?;
        if let Some(id) = &self.next_stage_id {
            check_name("next_stage_id", id, NAME_BYTES_MAX)?;
        }
        if self.n_stages == 0 || self.stage_index >= self.n_stages || self.n_stages > LAYERS_MAX {
            return Err(ProtocolError::InvalidValue { field: "stage_index", reason: "need stage_index < n_stages <= LAYERS_MAX" });
        }
        if self.context_length == 0 || self.context_length > SEQUENCE_POSITIONS_MAX {
            return Err(ProtocolError::InvalidValue { field: "context_length", reason: "outside 1..=SEQUENCE_POSITIONS_MAX" });
        }
        if self.sequences_max == 0 || self.sequences_max > SEGMENTS_MAX {
            return Err(ProtocolError::InvalidValue { field: "sequences_max", reason: "outside 1..=SEGMENTS_MAX" });
        }
        check_len("model_profile", self.model_profile.len(), MODEL_PROFILE_BYTES_MAX)?;
        check_len("tensors", self.tensors.len(), TENSORS_PER_ASSIGNMENT_MAX)?;
        self.tensors.iter().try_for_each(TensorRef::validate)
    }
}

impl TensorRef {
    fn validate(&self) -> Result<(), ProtocolError> {
        check_name("tensor name", &self.name, NAME_BYTES_MAX)?;
        if self.dims.is_empty() {
            return Err(ProtocolError::InvalidValue { field: "dims", reason: "a tensor has at least one dimension" });
        }
        check_len("dims", self.dims.len(), TENSOR_DIMS_MAX)?;
        if self.bytes > TENSOR_BYTES_MAX {
            return Err(ProtocolError::TooLong { field: "tensor bytes", len: self.bytes, max: TENSOR_BYTES_MAX });
        }
        Ok(())
    }
}

impl LoadProgress {
    pub(crate) fn validate(&self) -> Result<(), ProtocolError> {
        if self.bytes_done > self.bytes_total {
            return Err(ProtocolError::InvalidValue { field: "bytes_done", reason: "exceeds bytes_total" });
        }
        Ok(())
    }
}
