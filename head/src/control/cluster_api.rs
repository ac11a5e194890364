//! `GET /api/cluster` (Lumen's own): every worker with its resources, the replicas placed on it
//! and their live load (requests running and waiting, KV cache use, throughput, speculative
//! decoding's acceptance once it verified a draft), for the dashboard and for operators.

use axum::Json;
use axum::extract::State;
use lumen_proto::v1 as pb;
use serde::Serialize;

use super::ControlState;
use crate::cluster::{ClusterSnapshot, ReplicaSnapshot, WorkerSnapshot};

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub address: String,
    pub alive: bool,
    /// `ALIVE`, `DRAINING` (shutting down: finishing its requests, taking no new ones) or `DEAD`.
    pub state: &'static str,
    pub lumen_version: String,
    pub registered_unix_ms: u64,
    pub last_heartbeat_ms_ago: u64,
    pub resources: ResourcesView,
    pub replicas: Vec<ReplicaView>,
    /// Sums over its replicas.
    pub running: u32,
    pub waiting: u32,
}

#[derive(Debug, Serialize)]
pub struct ResourcesView {
    /// `cpu` or `cuda`.
    pub device_kind: String,
    pub device_count: u32,
    /// Per device (host memory for the CPU).
    pub device_memory_bytes: u64,
    pub cpus: u32,
    pub host_memory_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub replica_id: String,
    pub deployment: String,
    pub model: Option<String>,
    /// What the worker said the replica runs on (device, kernels, weight formats), e.g.
    /// `cuda:1 (BF16 weights and KV cache, 132 SMs)`; none before it runs.
    pub description: Option<String>,
    pub state: &'static str,
    pub message: Option<String>,
    /// Requests the head has in flight on it.
    pub in_flight: u32,
    /// From the worker's latest heartbeat.
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    /// `kv_blocks_used / kv_blocks_total` (0 before the first heartbeat).
    pub kv_cache_usage: f64,
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    /// Speculative decoding since the replica started; `null` until it verified a draft.
    pub spec_decode: Option<SpecDecodeView>,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct SpecDecodeView {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// `accepted_tokens / draft_tokens`.
    pub acceptance_rate: f64,
    /// `accepted_tokens / drafts` (the bonus token not included).
    pub mean_accepted_tokens: f64,
}

/// `GET /api/cluster`.
pub async fn cluster(State(state): State<ControlState>) -> Json<ClusterView> {
    Json(view(&state.applications.cluster().snapshot()))
}

pub fn view(snapshot: &ClusterSnapshot) -> ClusterView {
    ClusterView { workers: snapshot.workers.iter().map(|w| worker(snapshot, w)).collect() }
}

fn worker(snapshot: &ClusterSnapshot, w: &WorkerSnapshot) -> WorkerView {
    let replicas: Vec<ReplicaView> = snapshot.replicas.iter().filter(|r| r.worker_id == w.id).map(replica).collect();
    WorkerView {
        id: w.id.clone(),
        address: w.address.clone(),
        alive: w.alive,
        state: match (w.alive, w.draining) {
            (false, _) => "DEAD",
            (true, true) => "DRAINING",
            (true, false) => "ALIVE",
        },
        lumen_version: w.lumen_version.clone(),
        registered_unix_ms: w.registered_unix_ms,
        last_heartbeat_ms_ago: u64::try_from(w.since_last_heartbeat.as_millis()).unwrap_or(u64::MAX),
        resources: ResourcesView {
            device_kind: w.resources.device_kind.clone(),
            device_count: w.resources.device_count,
            device_memory_bytes: w.resources.device_memory_bytes,
            cpus: w.resources.cpu_cores,
            host_memory_bytes: w.resources.host_memory_bytes,
        },
        running: replicas.iter().map(|r| r.running).sum(),
        waiting: replicas.iter().map(|r| r.waiting).sum(),
        replicas,
    }
}

fn replica(r: &ReplicaSnapshot) -> ReplicaView {
    let stats = r.stats.clone().unwrap_or_default();
    let kv_cache_usage =
        if stats.kv_blocks_total == 0 { 0.0 } else { stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64 };
    ReplicaView {
        replica_id: r.replica_id.clone(),
        deployment: r.deployment.clone(),
        model: r.info.as_ref().map(|i| i.model_name.clone()).filter(|m| !m.is_empty()),
        description: r.info.as_ref().map(|i| i.description.clone()).filter(|d| !d.is_empty()),
        state: r.state.as_ray_str(),
        message: r.message.clone(),
        in_flight: r.in_flight,
        running: stats.running,
        waiting: stats.waiting,
        kv_blocks_used: stats.kv_blocks_used,
        kv_blocks_total: stats.kv_blocks_total,
        kv_cache_usage,
        prompt_tokens_per_s: stats.prompt_tokens_per_s,
        generation_tokens_per_s: stats.generation_tokens_per_s,
        spec_decode: spec_decode(&stats),
    }
}

fn spec_decode(stats: &pb::ReplicaStats) -> Option<SpecDecodeView> {
    let (drafts, draft_tokens, accepted_tokens) =
        (stats.spec_decode_drafts, stats.spec_decode_draft_tokens, stats.spec_decode_accepted_tokens);
    (drafts > 0).then(|| SpecDecodeView {
        drafts,
        draft_tokens,
        accepted_tokens,
        acceptance_rate: if draft_tokens == 0 { 0.0 } else { accepted_tokens as f64 / draft_tokens as f64 },
        mean_accepted_tokens: accepted_tokens as f64 / drafts as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_decode_shows_acceptance_only_once_a_draft_was_verified() {
        let stats = pb::ReplicaStats {
            spec_decode_drafts: 4,
            spec_decode_draft_tokens: 12,
            spec_decode_accepted_tokens: 9,
            ..Default::default()
        };
        let view = spec_decode(&stats).expect("drafts > 0");
        assert_eq!((view.drafts, view.draft_tokens, view.accepted_tokens), (4, 12, 9));
        assert_eq!(view.acceptance_rate, 0.75);
        assert_eq!(view.mean_accepted_tokens, 2.25);
        assert_eq!(spec_decode(&pb::ReplicaStats::default()), None);
    }
}
