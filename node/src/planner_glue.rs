//! The planner's view of a node and of a model: this machine's measured [`DeviceProfile`]
//! (or what a worker's `Hello` said) as the shard planner's [`NodeProfile`], the engine's
//! [`potluck_engine::profile::ModelProfile`] as the planner's model.
//!
//! **Architecture Invariant:** the conversion lives here, not in the engine: the engine may
//! not depend on the planner, and the planner may not depend on any workspace crate.

use potluck_engine::device::{DeviceBackend, DeviceProfile};
use potluck_shard_planner::{Backend, NodeProfile};

// The wire's bound on a model's blocks is the planner's: neither crate may depend on the
// other, so the one crate that sees both holds them together.
const _: () = assert!(potluck_protocol::limits::LAYERS_MAX == potluck_shard_planner::limits::LAYERS_MAX);
// The planner's built-in model specs size the KV cache as the engine keeps it.
const _: () = assert!(potluck_engine::profile::KV_ELEMENT_BYTES == potluck_shard_planner::specs::KV_ELEMENT_BYTES_DEFAULT);

/// Compute threads when `--threads` is not given: every core the OS lets us use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The planner's view of this device, as node `id`.
///
/// `matmul_flops_per_s` is the in-cache decode throughput, not the prefill one: the planner
/// adds compute time to the time it takes to read the weights, so its throughput must be
/// measured with the weights already in cache (docs/planner.md), and it prices a decode step,
/// where each weight block meets one row, not a tile of prompt rows.
pub fn node_profile(device: &DeviceProfile, id: &str) -> NodeProfile {
    let backend = match device.backend {
        DeviceBackend::Cpu => Backend::Cpu,
    };
    NodeProfile {
        id: id.to_string(),
        backend,
        memory_budget_bytes: device.memory_budget_bytes,
        // `as` saturates and maps NaN to 0; measured rates are finite and positive, and the
        // planner rejects a zero rate with an error of its own.
        memory_bandwidth_bytes_per_s: device.memory_bandwidth_bytes_per_s as u64,
        matmul_flops_per_s: device.qmatmul_decode_cached_flops_per_s as u64,
    }
}

/// What `Hello` tells the coordinator about this device.
pub fn device_summary(device: &DeviceProfile) -> potluck_protocol::DeviceSummary {
    potluck_protocol::DeviceSummary {
        backend: match device.backend {
            DeviceBackend::Cpu => "cpu".into(),
        },
        memory_budget_bytes: device.memory_budget_bytes,
        memory_bandwidth_bytes_per_s: device.memory_bandwidth_bytes_per_s,
        matmul_flops_per_s: device.qmatmul_decode_cached_flops_per_s,
        threads: device.threads as u32,
    }
}

/// The planner's view of a node from what its `Hello` said.
pub fn node_profile_from_summary(device: &potluck_protocol::DeviceSummary, id: &str) -> NodeProfile {
    NodeProfile {
        id: id.to_string(),
        // Only CPU nodes exist today; an unknown backend is priced as a CPU.
        backend: Backend::Cpu,
        memory_budget_bytes: device.memory_budget_bytes,
        memory_bandwidth_bytes_per_s: device.memory_bandwidth_bytes_per_s as u64,
        matmul_flops_per_s: device.matmul_flops_per_s as u64,
    }
}

/// The planner's view of a model from the engine's profile (its GGUF header).
pub fn planner_model(p: &potluck_engine::profile::ModelProfile, name: &str) -> potluck_shard_planner::ModelProfile {
    use potluck_shard_planner::{dense_layer_flops_per_token, head_flops_per_token};
    let (n_embd, n_ff) = (p.n_embd as u64, p.n_ff as u64);
    let layer_flops = match p.experts {
        // Attention, the router, and the experts a token uses (3 matrices of n_embd × n_ff).
        Some(e) => {
            let attention_and_ffn = dense_layer_flops_per_token(n_embd, 0, p.n_head as u64, p.n_head_kv as u64, p.head_dim as u64);
            attention_and_ffn + 2 * n_embd * (u64::from(e.count) + 3 * u64::from(e.used) * e.n_ff as u64)
        }
        None => dense_layer_flops_per_token(n_embd, n_ff, p.n_head as u64, p.n_head_kv as u64, p.head_dim as u64),
    };
    let mut model = potluck_shard_planner::ModelProfile::dense(
        name.to_string(),
        p.layer_weight_bytes.clone(),
        layer_flops,
        p.embedding_bytes,
        p.head_bytes,
        head_flops_per_token(p.n_embd as u64, p.vocab_size as u64),
        p.tied_embeddings,
        p.kv_bytes_per_token_per_layer,
        p.activation_bytes_per_token,
    );
    model.layer_kv_positions_max = p.layer_kv_positions_max();
    // A mixture of experts holds every expert and reads the ones a token uses.
    model.layer_read_bytes_per_token = (0..p.n_layers as usize).map(|i| p.layer_bytes_read_per_token(i)).collect();
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_profile_carries_budget_bandwidth_and_decode_compute() {
        let device = DeviceProfile {
            backend: DeviceBackend::Cpu,
            cpu_model: None,
            kernels: "avx2".into(),
            threads: 8,
            total_memory_bytes: 32 << 30,
            available_memory_bytes: 24 << 30,
            memory_reserve_bytes: 3 << 30,
            memory_budget_bytes: 21 << 30,
            memory_bandwidth_bytes_per_s: 51.2e9,
            qmatmul_decode_bytes_per_s: 40.5e9,
            qmatmul_decode_cached_flops_per_s: 310.7e9,
            qmatmul_prefill_flops_per_s: 900e9,
            measured_ms: 1200,
        };
        let node = node_profile(&device, "laptop");
        assert_eq!(
            node,
            NodeProfile {
                id: "laptop".into(),
                backend: Backend::Cpu,
                memory_budget_bytes: 21 << 30,
                memory_bandwidth_bytes_per_s: 51_200_000_000,
                matmul_flops_per_s: 310_700_000_000,
            }
        );
    }

    /// A mixture of experts is priced by what a token reads: every expert held, the used
    /// ones read; the dense parts read in full.
    #[test]
    fn experts_are_held_whole_and_read_by_use() {
        use potluck_engine::random_gguf::{ModelShape, RandomGguf};
        let path = std::env::temp_dir().join(format!("potluck-glue-moe-{}.gguf", std::process::id()));
        let model = RandomGguf::new(ModelShape::tiny_moe(), candle_core::quantized::GgmlDType::Q8_0, 7);
        model.write(&path).unwrap();
        let (profile, _) = potluck_engine::profile::ModelProfile::from_path(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let planned = planner_model(&profile, "tiny-moe");
        let experts = profile.experts.unwrap();
        assert_eq!((experts.count, experts.used, experts.n_ff), (8, 2, 256));
        for layer in 0..profile.n_layers as usize {
            let held = planned.layer_weight_bytes[layer];
            let expert_bytes = profile.layer_expert_bytes[layer];
            assert!(expert_bytes > held / 2, "the experts are most of a block");
            assert_eq!(planned.layer_read_bytes_per_token[layer], held - expert_bytes + expert_bytes / 4);
        }
        // FLOPs count the router and the 2 used experts of 8, not all of them.
        let attention = potluck_shard_planner::dense_layer_flops_per_token(256, 0, 4, 2, 64);
        assert_eq!(planned.layer_flops_per_token[0], attention + 2 * 256 * (8 + 3 * 2 * 256));
    }
}
