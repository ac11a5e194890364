//! Ray Serve's status document (`GET /api/serve/applications/`) from a [`ClusterSnapshot`] and
//! the applied serve config.
//!
//! An application's status derives from its deployments': any `UNHEALTHY` makes it `UNHEALTHY`
//! (with that deployment's message), else any `UPDATING` makes it `DEPLOYING`, else it is
//! `RUNNING`; an application removed while its replicas are still stopping is `DELETING`.
//! Messages say why something is not running (placement or start failures, from the snapshot).
//! The same types deserialize the document in `lumen status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::{ClusterSnapshot, Deployment, DeploymentSnapshot, DeploymentStatus, ReplicaSnapshot};

/// The application name deployments outside any serve config are listed under (`lumen serve
/// --model`), as Ray's `serve run` names its application.
pub const DEFAULT_APPLICATION: &str = "default";

/// The whole document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServeStatus {
    pub applications: BTreeMap<String, ApplicationStatus>,
    #[serde(default)]
    pub target_capacity: Option<f64>,
    #[serde(default)]
    pub proxy_location: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplicationStatus {
    pub name: String,
    pub route_prefix: Option<String>,
    /// `NOT_STARTED`, `DEPLOYING`, `RUNNING`, `UNHEALTHY`, `DELETING` or `DEPLOY_FAILED`.
    pub status: String,
    /// Why the application is not `RUNNING` ("" when it is).
    pub message: String,
    pub last_deployed_time_s: f64,
    /// The application's part of the serve config, as given (null outside a serve config).
    pub deployed_app_config: Option<Value>,
    pub deployments: BTreeMap<String, DeploymentStatusDoc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatusDoc {
    pub name: String,
    /// `UPDATING`, `HEALTHY` or `UNHEALTHY`.
    pub status: String,
    pub message: String,
    pub target_num_replicas: u32,
    /// Replicas per state (`RUNNING`, `STARTING`, `STOPPING`, `FAILED`, `UNHEALTHY`).
    pub replica_states: BTreeMap<String, u32>,
    pub replicas: Vec<ReplicaStatusDoc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatusDoc {
    pub replica_id: String,
    pub state: String,
    /// The worker's id.
    pub node_id: String,
    /// The host of the worker's address.
    pub node_ip: String,
    pub start_time_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An application of the applied serve config.
#[derive(Clone, Debug)]
pub struct AppliedApplication {
    pub name: String,
    pub route_prefix: Option<String>,
    pub config: Option<Value>,
    pub deployed_time_s: Option<f64>,
    /// Its deployments' names inside the application.
    pub deployments: Vec<String>,
}

/// Builds the document: the applied applications (in config order), the deployments outside
/// any serve config, and `removed` deployments whose replicas are still stopping.
pub fn build(snapshot: &ClusterSnapshot, applied: &[AppliedApplication], removed: &[Deployment]) -> ServeStatus {
    let mut applications = BTreeMap::new();
    for app in applied {
        let deployments: Vec<&DeploymentSnapshot> =
            snapshot.deployments.iter().filter(|d| d.spec.application == app.name).collect();
        let mut status = application(snapshot, &app.name, &deployments);
        if deployments.len() < app.deployments.len() {
            (status.status, status.message) = ("NOT_STARTED".into(), "the deployments are not created yet".into());
        }
        status.route_prefix = app.route_prefix.clone();
        status.deployed_app_config = app.config.clone();
        status.last_deployed_time_s = app.deployed_time_s.unwrap_or(status.last_deployed_time_s);
        applications.insert(app.name.clone(), status);
    }
    for d in &snapshot.deployments {
        let name = application_name(&d.spec);
        if applications.contains_key(name) {
            continue;
        }
        let deployments: Vec<&DeploymentSnapshot> =
            snapshot.deployments.iter().filter(|o| application_name(&o.spec) == name).collect();
        let mut status = application(snapshot, name, &deployments);
        status.route_prefix = Some("/".into());
        applications.insert(name.to_owned(), status);
    }
    for gone in removed {
        let name = application_name(gone);
        let replicas: Vec<&ReplicaSnapshot> = snapshot.replicas.iter().filter(|r| r.deployment == gone.name).collect();
        if replicas.is_empty() || applications.get(name).is_some_and(|a| a.status != "DELETING") {
            continue;
        }
        let app = applications.entry(name.to_owned()).or_insert_with(|| ApplicationStatus {
            name: name.to_owned(),
            route_prefix: None,
            status: "DELETING".into(),
            message: String::new(),
            last_deployed_time_s: 0.0,
            deployed_app_config: None,
            deployments: BTreeMap::new(),
        });
        let mut doc = deployment_doc(snapshot, short_name(gone), &replicas);
        doc.status = "UPDATING".into();
        doc.message = format!("deleting: {} replicas still stopping", replicas.len());
        doc.target_num_replicas = 0;
        app.message = "the application is being deleted".into();
        app.deployments.insert(doc.name.clone(), doc);
    }
    ServeStatus { applications, target_capacity: None, proxy_location: "EveryNode".into() }
}

fn application_name(spec: &Deployment) -> &str {
    if spec.application.is_empty() { DEFAULT_APPLICATION } else { &spec.application }
}

/// The deployment's name inside its application (the whole name outside a serve config).
fn short_name(spec: &Deployment) -> &str {
    if spec.deployment_name.is_empty() { &spec.name } else { &spec.deployment_name }
}

fn application(snapshot: &ClusterSnapshot, name: &str, deployments: &[&DeploymentSnapshot]) -> ApplicationStatus {
    let mut docs = BTreeMap::new();
    let (mut unhealthy, mut updating) = (None, None);
    for d in deployments {
        let replicas: Vec<&ReplicaSnapshot> =
            snapshot.replicas.iter().filter(|r| r.deployment == d.spec.name).collect();
        let mut doc = deployment_doc(snapshot, short_name(&d.spec), &replicas);
        doc.status = d.status.as_ray_str().into();
        doc.target_num_replicas = d.target_replicas;
        doc.message = deployment_message(d, &replicas);
        let why = format!("deployment `{}`: {}", doc.name, doc.message);
        match d.status {
            DeploymentStatus::Unhealthy => unhealthy = unhealthy.or(Some(why)),
            DeploymentStatus::Updating => updating = updating.or(Some(why)),
            // Healthy, and (as in Ray) scaling up or down: the application keeps running.
            _ => {}
        }
        docs.insert(doc.name.clone(), doc);
    }
    let (status, message) = match (unhealthy, updating) {
        (Some(why), _) => ("UNHEALTHY", why),
        (None, Some(why)) => ("DEPLOYING", why),
        (None, None) => ("RUNNING", String::new()),
    };
    ApplicationStatus {
        name: name.to_owned(),
        route_prefix: None,
        status: status.into(),
        message,
        last_deployed_time_s: deployments.iter().map(|d| d.created_unix_s as f64).fold(0.0, f64::max),
        deployed_app_config: None,
        deployments: docs,
    }
}

/// The deployment's own message, else the first failed replica's, else what it is waiting for.
fn deployment_message(d: &DeploymentSnapshot, replicas: &[&ReplicaSnapshot]) -> String {
    if d.status == DeploymentStatus::Healthy {
        return String::new();
    }
    if let Some(message) = &d.message {
        return message.clone();
    }
    if let Some((id, message)) = replicas.iter().find_map(|r| r.message.as_ref().map(|m| (&r.replica_id, m))) {
        return format!("replica `{id}`: {message}");
    }
    match d.status {
        DeploymentStatus::Downscaling => format!("scaling down to {} replicas", d.target_replicas),
        _ => format!("{} of {} replicas running", d.running_replicas, d.target_replicas),
    }
}

fn deployment_doc(snapshot: &ClusterSnapshot, name: &str, replicas: &[&ReplicaSnapshot]) -> DeploymentStatusDoc {
    let mut replica_states = BTreeMap::new();
    for r in replicas {
        *replica_states.entry(r.state.as_ray_str().to_owned()).or_insert(0) += 1;
    }
    DeploymentStatusDoc {
        name: name.to_owned(),
        status: String::new(),
        message: String::new(),
        target_num_replicas: 0,
        replica_states,
        replicas: replicas
            .iter()
            .map(|r| {
                let address = snapshot.workers.iter().find(|w| w.id == r.worker_id).map(|w| w.address.as_str());
                ReplicaStatusDoc {
                    replica_id: r.replica_id.clone(),
                    state: r.state.as_ray_str().into(),
                    node_id: r.worker_id.clone(),
                    node_ip: address.map(host_of).unwrap_or_default(),
                    start_time_s: Some(r.start_time_s),
                    message: r.message.clone(),
                }
            })
            .collect(),
    }
}

/// The host part of a worker address (`http://10.0.0.7:50052` -> `10.0.0.7`).
fn host_of(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_owned();
    }
    authority.rsplit_once(':').map_or(authority, |(host, _)| host).to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lumen_proto::v1 as pb;

    use super::*;
    use crate::cluster::{ReplicaState, WorkerSnapshot};

    fn spec(app: &str, name: &str, replicas: u32) -> Deployment {
        Deployment {
            name: format!("{app}-{name}"),
            application: app.into(),
            deployment_name: name.into(),
            model_name: format!("{app}-model"),
            num_replicas: replicas,
            ..Deployment::default()
        }
    }

    fn deployment(
        spec: Deployment,
        status: DeploymentStatus,
        message: Option<&str>,
        running: u32,
    ) -> DeploymentSnapshot {
        let spec_replicas = spec.num_replicas;
        DeploymentSnapshot {
            spec,
            status,
            message: message.map(str::to_owned),
            created_unix_s: 1_700_000_000,
            running_replicas: running,
            target_replicas: spec_replicas,
        }
    }

    fn replica(id: &str, deployment: &str, state: ReplicaState) -> ReplicaSnapshot {
        ReplicaSnapshot {
            replica_id: id.into(),
            deployment: deployment.into(),
            worker_id: "w1".into(),
            state,
            message: None,
            in_flight: 0,
            info: None,
            stats: None,
            start_time_s: 1_764_000_000.5,
        }
    }

    fn snapshot(deployments: Vec<DeploymentSnapshot>, replicas: Vec<ReplicaSnapshot>) -> ClusterSnapshot {
        let worker = WorkerSnapshot {
            id: "w1".into(),
            address: "http://10.1.2.3:50052".into(),
            resources: pb::Resources::default(),
            lumen_version: "test".into(),
            alive: true,
            draining: false,
            registered_unix_ms: 0,
            since_last_heartbeat: Duration::ZERO,
            replica_ids: replicas.iter().map(|r| r.replica_id.clone()).collect(),
        };
        ClusterSnapshot { workers: vec![worker], deployments, replicas }
    }

    fn applied(name: &str, deployments: &[&str]) -> AppliedApplication {
        AppliedApplication {
            name: name.into(),
            route_prefix: Some("/".into()),
            config: Some(serde_json::json!({"name": name})),
            deployed_time_s: Some(1_700_000_123.5),
            deployments: deployments.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn a_healthy_application_runs_and_counts_its_replicas_by_state() {
        let snap = snapshot(
            vec![deployment(spec("chat", "llm", 2), DeploymentStatus::Healthy, None, 2)],
            vec![
                replica("chat-llm-1", "chat-llm", ReplicaState::Running),
                replica("chat-llm-2", "chat-llm", ReplicaState::Running),
            ],
        );
        let doc = build(&snap, &[applied("chat", &["llm"])], &[]);
        let app = &doc.applications["chat"];
        assert_eq!((app.status.as_str(), app.message.as_str()), ("RUNNING", ""));
        assert_eq!(app.last_deployed_time_s, 1_700_000_123.5);
        assert_eq!(app.deployed_app_config, Some(serde_json::json!({"name": "chat"})));
        let llm = &app.deployments["llm"];
        assert_eq!((llm.status.as_str(), llm.target_num_replicas), ("HEALTHY", 2));
        assert_eq!(llm.replica_states, BTreeMap::from([("RUNNING".to_owned(), 2)]));
        assert_eq!((llm.replicas[0].node_id.as_str(), llm.replicas[0].node_ip.as_str()), ("w1", "10.1.2.3"));
        assert_eq!(llm.replicas[0].start_time_s, Some(1_764_000_000.5), "Ray reports when a replica started");
    }

    #[test]
    fn an_unhealthy_deployment_makes_its_application_unhealthy_with_the_reason() {
        let snap = snapshot(
            vec![
                deployment(spec("chat", "llm", 1), DeploymentStatus::Healthy, None, 1),
                deployment(spec("chat", "big", 1), DeploymentStatus::Unhealthy, Some("no worker has a free GPU"), 0),
            ],
            vec![replica("chat-llm-1", "chat-llm", ReplicaState::Running)],
        );
        let doc = build(&snap, &[applied("chat", &["llm", "big"])], &[]);
        let app = &doc.applications["chat"];
        assert_eq!(app.status, "UNHEALTHY");
        assert!(app.message.contains("big") && app.message.contains("no worker has a free GPU"), "{}", app.message);
        assert_eq!(app.deployments["big"].message, "no worker has a free GPU");
    }

    #[test]
    fn an_updating_deployment_makes_its_application_deploying_and_says_what_is_missing() {
        let snap = snapshot(
            vec![deployment(spec("chat", "llm", 2), DeploymentStatus::Updating, None, 1)],
            vec![
                replica("chat-llm-1", "chat-llm", ReplicaState::Running),
                replica("chat-llm-2", "chat-llm", ReplicaState::Starting),
            ],
        );
        let doc = build(&snap, &[applied("chat", &["llm"])], &[]);
        let app = &doc.applications["chat"];
        assert_eq!(app.status, "DEPLOYING");
        assert!(app.message.contains("1 of 2 replicas running"), "{}", app.message);
        let states = &app.deployments["llm"].replica_states;
        assert_eq!((states["RUNNING"], states["STARTING"]), (1, 1));
    }

    #[test]
    fn a_removed_application_is_deleting_until_its_replicas_are_gone() {
        let gone = spec("old", "llm", 1);
        let stopping = snapshot(vec![], vec![replica("old-llm-1", "old-llm", ReplicaState::Stopping)]);
        let doc = build(&stopping, &[], std::slice::from_ref(&gone));
        assert_eq!(doc.applications["old"].status, "DELETING");
        assert_eq!(doc.applications["old"].deployments["llm"].replica_states["STOPPING"], 1);
        let doc = build(&snapshot(vec![], vec![]), &[], &[gone]);
        assert!(doc.applications.is_empty());
    }

    #[test]
    fn deployments_outside_a_serve_config_are_listed_under_the_default_application() {
        let mut flags = spec("", "", 1);
        flags.name = "default".into();
        let snap = snapshot(vec![deployment(flags, DeploymentStatus::Healthy, None, 1)], vec![]);
        let doc = build(&snap, &[], &[]);
        let app = &doc.applications[DEFAULT_APPLICATION];
        assert_eq!((app.status.as_str(), app.deployed_app_config.as_ref()), ("RUNNING", None));
        assert!(app.deployments.contains_key("default"));
    }

    #[test]
    fn node_ip_is_the_host_of_the_worker_address() {
        assert_eq!(host_of("http://10.0.0.7:50052"), "10.0.0.7");
        assert_eq!(host_of("http://[::1]:50052"), "::1");
        assert_eq!(host_of("worker-0.lumen:50052"), "worker-0.lumen");
        assert_eq!(host_of("http://worker-0/x"), "worker-0");
    }
}
