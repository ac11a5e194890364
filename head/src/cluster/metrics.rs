//! The cluster's Prometheus series, collected from a [`Cluster::snapshot`] at every scrape of the
//! head's `/metrics` (8000 and 8265 gather the same registry):
//!
//! - vLLM's `vllm:*` series of every replica, from the latest heartbeat its worker sent,
//!   labelled `model_name`, `deployment`, `replica`, `worker` (the conversion is
//!   `lumen_proto::metrics`, the same a worker's own `/metrics` uses). Replicas whose worker
//!   is not alive are left out (their last numbers would be stale), as are replicas that have
//!   not reported a model yet.
//! - `lumen_serve_deployment_replicas{deployment,state}`: replicas per deployment in each of
//!   Ray's states (`STARTING`, `RUNNING`, `STOPPING`, plus Lumen's `FAILED`, `UNHEALTHY`), zeros
//!   included, for every desired deployment and any removed one whose replicas still stop.
//! - `lumen_cluster_workers{state}`: registered workers, `alive`, `draining` (alive, finishing
//!   its requests after SIGTERM, taking no new ones) and `dead`, as in `/api/cluster`.
//! - The head's loop timings, `lumen_head_reconcile_duration_seconds` and
//!   `lumen_head_heartbeat_duration_seconds` (see `loop_time`).

use std::collections::BTreeMap;

use lumen_proto::metrics::{Families, HEAD_LABELS, replica_descs};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use super::{Cluster, ClusterSnapshot, ReplicaState};

const DEPLOYMENT_REPLICAS: &str = "lumen_serve_deployment_replicas";
const DEPLOYMENT_REPLICAS_HELP: &str = "Replicas of a deployment, by state.";
const CLUSTER_WORKERS: &str = "lumen_cluster_workers";
const CLUSTER_WORKERS_HELP: &str = "Workers registered with the head, by state (alive, draining or dead).";

const REPLICA_STATES: [ReplicaState; 5] = [
    ReplicaState::Starting,
    ReplicaState::Running,
    ReplicaState::Stopping,
    ReplicaState::Failed,
    ReplicaState::Unhealthy,
];

/// A [`Collector`] over a cluster; register it into the head's registry.
pub struct ClusterMetrics {
    cluster: Cluster,
    descs: Vec<Desc>,
}

impl ClusterMetrics {
    pub fn new(cluster: Cluster) -> Result<ClusterMetrics, prometheus::Error> {
        let mut descs = replica_descs(&HEAD_LABELS)?;
        let labels = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        descs.push(Desc::new(
            DEPLOYMENT_REPLICAS.into(),
            DEPLOYMENT_REPLICAS_HELP.into(),
            labels(&["deployment", "state"]),
            Default::default(),
        )?);
        descs.push(Desc::new(
            CLUSTER_WORKERS.into(),
            CLUSTER_WORKERS_HELP.into(),
            labels(&["state"]),
            Default::default(),
        )?);
        Ok(ClusterMetrics { cluster, descs })
    }
}

impl Collector for ClusterMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().chain(self.cluster.inner.loops.descs()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut all = families(&self.cluster.snapshot());
        all.extend(self.cluster.inner.loops.collect());
        all
    }
}

/// Every series of `snapshot` (see the module docs).
fn families(snapshot: &ClusterSnapshot) -> Vec<MetricFamily> {
    let mut families = Families::new();
    for replica in &snapshot.replicas {
        if replica.state == ReplicaState::Unhealthy {
            continue;
        }
        let Some(stats) = &replica.stats else { continue };
        let model = match (&replica.info, stats.model_name.as_str()) {
            (_, name) if !name.is_empty() => name,
            (Some(info), _) => info.model_name.as_str(),
            (None, _) => "",
        };
        if model.is_empty() {
            continue;
        }
        let [model_label, deployment, replica_label, worker] = HEAD_LABELS;
        let labels = [
            (model_label, model),
            (deployment, replica.deployment.as_str()),
            (replica_label, replica.replica_id.as_str()),
            (worker, replica.worker_id.as_str()),
        ];
        families.add_replica(stats, &labels);
    }

    let mut by_deployment: BTreeMap<&str, [u32; REPLICA_STATES.len()]> =
        snapshot.deployments.iter().map(|d| (d.spec.name.as_str(), [0; REPLICA_STATES.len()])).collect();
    for replica in &snapshot.replicas {
        let counts = by_deployment.entry(replica.deployment.as_str()).or_default();
        if let Some(at) = REPLICA_STATES.iter().position(|s| *s == replica.state) {
            counts[at] += 1;
        }
    }
    for (deployment, counts) in by_deployment {
        for (state, count) in REPLICA_STATES.iter().zip(counts) {
            let labels = [("deployment", deployment), ("state", state.as_ray_str())];
            families.gauge(DEPLOYMENT_REPLICAS, DEPLOYMENT_REPLICAS_HELP, &labels, f64::from(count));
        }
    }

    let draining = snapshot.workers.iter().filter(|w| w.alive && w.draining).count();
    let alive = snapshot.workers.iter().filter(|w| w.alive).count() - draining;
    let dead = snapshot.workers.len() - alive - draining;
    for (state, count) in [("alive", alive), ("draining", draining), ("dead", dead)] {
        families.gauge(CLUSTER_WORKERS, CLUSTER_WORKERS_HELP, &[("state", state)], count as f64);
    }
    families.into_vec()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lumen_proto::metrics::encode_text;
    use lumen_proto::v1 as pb;

    use super::*;
    use crate::cluster::{ReplicaSnapshot, WorkerSnapshot};

    fn worker(id: &str, alive: bool) -> WorkerSnapshot {
        WorkerSnapshot {
            id: id.into(),
            address: String::new(),
            resources: pb::Resources::default(),
            lumen_version: String::new(),
            alive,
            draining: false,
            registered_unix_ms: 0,
            since_last_heartbeat: Duration::ZERO,
            replica_ids: Vec::new(),
        }
    }

    fn replica(id: &str, worker: &str, state: ReplicaState, generated: u64) -> ReplicaSnapshot {
        ReplicaSnapshot {
            replica_id: id.into(),
            deployment: "llm".into(),
            worker_id: worker.into(),
            state,
            message: None,
            in_flight: 0,
            info: None,
            stats: Some(pb::ReplicaStats {
                replica_id: id.into(),
                model_name: "smol".into(),
                generation_tokens_total: generated,
                ..Default::default()
            }),
            start_time_s: 0.0,
        }
    }

    #[test]
    fn replicas_are_labelled_and_dead_workers_replicas_left_out() {
        let snapshot = ClusterSnapshot {
            workers: vec![
                worker("w1", true),
                worker("w2", false),
                WorkerSnapshot { draining: true, ..worker("w3", true) },
            ],
            deployments: Vec::new(),
            replicas: vec![
                replica("llm-a", "w1", ReplicaState::Running, 7),
                replica("llm-b", "w2", ReplicaState::Unhealthy, 5),
            ],
        };
        let text = encode_text(&families(&snapshot)).expect("encodes");
        let line = r#"vllm:generation_tokens_total{model_name="smol",deployment="llm",replica="llm-a",worker="w1"} 7"#;
        assert!(text.lines().any(|l| l == line), "{text}");
        assert!(!text.contains(r#"replica="llm-b""#), "a dead worker's replica is not exported:\n{text}");
        for line in [
            r#"lumen_cluster_workers{state="alive"} 1"#,
            r#"lumen_cluster_workers{state="draining"} 1"#,
            r#"lumen_cluster_workers{state="dead"} 1"#,
            r#"lumen_serve_deployment_replicas{deployment="llm",state="RUNNING"} 1"#,
            r#"lumen_serve_deployment_replicas{deployment="llm",state="UNHEALTHY"} 1"#,
            r#"lumen_serve_deployment_replicas{deployment="llm",state="STARTING"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn the_collector_registers_beside_the_api_metrics() {
        let registry = prometheus::Registry::new();
        let collector = ClusterMetrics::new(Cluster::new(Default::default())).expect("descriptors");
        registry.register(Box::new(collector)).expect("registers");
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_string()).collect();
        assert_eq!(
            names,
            [CLUSTER_WORKERS, "lumen_head_heartbeat_duration_seconds", "lumen_head_reconcile_duration_seconds"],
            "an empty cluster has only its worker counts and the head's loop timings"
        );
    }
}
