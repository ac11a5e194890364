//! The registry's unit tests: validation, adoption of reported replicas, liveness, versions and targets.

use super::*;

const DEADLINE: Duration = Duration::from_secs(3);

fn deployment(name: &str, model: &str) -> Deployment {
    Deployment {
        name: name.into(),
        model_name: model.into(),
        engine_options_json: "{}".into(),
        ..Deployment::default()
    }
}

fn register(state: &mut State, id: &str, kind: &str, devices: u32, replicas: Vec<pb::ReplicaInfo>) {
    let req = pb::RegisterRequest {
        worker_id: id.into(),
        address: format!("http://{id}"),
        resources: Some(pb::Resources { device_kind: kind.into(), device_count: devices, ..Default::default() }),
        replicas,
        ..Default::default()
    };
    state.register_worker(&req, Instant::now());
}

fn running(id: &str, model: &str) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        replica_id: id.into(),
        model_name: model.into(),
        state: pb::ReplicaState::Running as i32,
        ..Default::default()
    }
}

#[test]
fn rejects_duplicate_names_and_model_names() {
    let dup_name = [deployment("a", "m1"), deployment("a", "m2")];
    assert!(matches!(validate_deployments(&dup_name), Err(ClusterError::DuplicateDeployment { .. })));
    let dup_model = [deployment("a", "m"), deployment("b", "m")];
    assert!(matches!(validate_deployments(&dup_model), Err(ClusterError::DuplicateModelName { .. })));
    assert!(validate_deployments(&[deployment("a", "m1"), deployment("b", "m2")]).is_ok());
}

#[test]
fn re_registration_adopts_reported_replicas_and_forgets_vanished_ones() {
    let mut state = State::default();
    state.set_deployments(vec![deployment("llm", "m")]);
    register(&mut state, "w", "cpu", 0, vec![running("llm-aaaa", "m"), running("llm-bbbb", "m")]);
    register(&mut state, "w", "cpu", 0, vec![running("llm-bbbb", "m"), running("x9-cccc", "m")]);
    let ids: Vec<(&str, &str)> = state.replicas.values().map(|r| (r.id.as_str(), r.deployment.as_str())).collect();
    // "x9-cccc" has no deployment `x9` but serves `m`, so it belongs to `llm`.
    assert_eq!(ids, [("llm-bbbb", "llm"), ("x9-cccc", "llm")]);
}

#[test]
fn adopted_replicas_are_current_only_when_the_options_they_report_match() {
    let mut state = State::default();
    let spec = Deployment { engine_options_json: r#"{"model":"m.gguf","threads":2}"#.into(), ..deployment("llm", "m") };
    state.set_deployments(vec![spec.clone()]);
    let echo = |id: &str, options: &str| pb::ReplicaInfo { engine_options_json: options.into(), ..running(id, "m") };
    let reported = vec![
        echo("llm-same", &spec.engine_options_json),
        echo("llm-old", r#"{"model":"m.gguf"}"#),
        running("llm-legacy", "m"),
    ];
    register(&mut state, "w", "cpu", 0, reported);
    let d = state.deployment("llm").unwrap();
    let current = |id: &str| d.is_current(&state.replicas[id]);
    assert!(current("llm-same"), "a head restart does not roll replicas that run the config");
    assert!(!current("llm-old"), "a replica started with other options is rolled");
    assert!(current("llm-legacy"), "without an echo, the served model name decides");
}

#[test]
fn silent_worker_is_marked_dead_and_revived_by_a_heartbeat() {
    let mut state = State::default();
    register(&mut state, "w", "cpu", 0, vec![]);
    // What a stream opened now watches (see `forward`).
    let silence = state.workers["w"].silent.subscribe();
    assert!(!*silence.borrow());
    let later = Instant::now() + DEADLINE + Duration::from_millis(1);
    assert_eq!(state.mark_silent_workers_dead(later, DEADLINE), ["w"]);
    assert!(!state.worker_is_live("w", later, DEADLINE));
    assert!(*silence.borrow(), "its streams hear that it went silent");
    let hb = pb::WorkerHeartbeat { worker_id: "w".into(), ..Default::default() };
    assert!(state.record_heartbeat(&hb, later).is_ok());
    assert!(state.worker_is_live("w", later, DEADLINE));
    assert!(!*silence.borrow(), "and that it is back");
    state.mark_silent_workers_dead(later + DEADLINE * 2, DEADLINE);
    register(&mut state, "w", "cpu", 0, vec![]);
    assert!(!*silence.borrow(), "a registration after it went silent reaches the streams opened before");
}

#[test]
fn heartbeat_from_unknown_worker_is_refused() {
    let hb = pb::WorkerHeartbeat { worker_id: "nobody".into(), ..Default::default() };
    assert!(State::default().record_heartbeat(&hb, Instant::now()).is_err());
}

#[test]
fn new_options_make_a_new_version_and_a_new_count_only_moves_the_target() {
    let mut state = State::default();
    state.set_deployments(vec![deployment("llm", "m")]);
    let first = state.deployment("llm").map(|d| d.version);
    state.set_deployments(vec![Deployment { num_replicas: 3, ..deployment("llm", "m") }]);
    let d = state.deployment("llm").expect("kept");
    assert_eq!((Some(d.version), d.target_replicas, d.scaling), (first, 3, Some(ScaleDirection::Up)));
    state.set_deployments(vec![Deployment { engine_options_json: r#"{"a":1}"#.into(), ..deployment("llm", "m") }]);
    let d = state.deployment("llm").expect("kept");
    assert_ne!(Some(d.version), first);
    assert_eq!((d.target_replicas, d.scaling), (1, Some(ScaleDirection::Down)));
}

#[test]
fn an_autoscaled_deployment_keeps_its_target_within_the_new_bounds() {
    let autoscaled = |min, max| Deployment {
        autoscaling: Some(AutoscalingConfig {
            min_replicas: min,
            initial_replicas: None,
            max_replicas: max,
            target_ongoing_requests: 2.0,
            upscale_delay_s: 30.0,
            downscale_delay_s: 600.0,
            ..AutoscalingConfig::default()
        }),
        num_replicas: min,
        ..deployment("llm", "m")
    };
    let mut state = State::default();
    state.set_deployments(vec![autoscaled(1, 8)]);
    state.deployment_mut("llm").expect("set").set_target(6);
    state.set_deployments(vec![autoscaled(2, 8)]);
    assert_eq!(state.deployment("llm").map(|d| d.target_replicas), Some(6), "a redeploy keeps the target");
    state.set_deployments(vec![autoscaled(1, 4)]);
    assert_eq!(state.deployment("llm").map(|d| d.target_replicas), Some(4), "clamped to max_replicas");
}

#[test]
fn an_adopted_replica_is_current_when_it_serves_the_deployments_model() {
    let mut state = State::default();
    state.set_deployments(vec![deployment("llm", "m")]);
    register(&mut state, "w", "cpu", 0, vec![running("llm-aaaa", "m"), running("llm-bbbb", "old-name")]);
    let d = state.deployment("llm").expect("set");
    let current: Vec<bool> = state.replicas.values().map(|r| d.is_current(r)).collect();
    assert_eq!(current, [true, false]);
}

#[test]
fn a_draining_worker_keeps_its_replicas_out_of_routing_and_placement_until_it_leaves() {
    let mut state = State::default();
    state.set_deployments(vec![deployment("llm", "m")]);
    register(&mut state, "old", "cpu", 1, vec![running("llm-00000001", "m")]);
    register(&mut state, "new", "cpu", 1, vec![]);
    let now = Instant::now();
    assert_eq!(state.routable_replicas("llm", now, DEADLINE).count(), 1);

    let beat = |draining| pb::WorkerHeartbeat { worker_id: "old".into(), draining, ..Default::default() };
    assert_eq!(state.record_heartbeat(&beat(true), now).ok(), Some(true), "the controller must act at once");
    assert_eq!(state.record_heartbeat(&beat(true), now).ok(), Some(false), "only the change is news");
    assert!(state.worker_is_live("old", now, DEADLINE), "a draining worker is alive: it finishes its requests");
    assert!(!state.worker_takes_work("old", now, DEADLINE));
    assert_eq!(state.routable_replicas("llm", now, DEADLINE).count(), 0);
    assert_eq!(state.live_replicas("llm", now, DEADLINE).count(), 0, "so the controller places a replacement");
    assert!(state.has_draining_replica("llm"));
    let spec = deployment("llm", "m");
    assert_eq!(super::super::placement::choose_worker(&state, &spec, now, DEADLINE).as_deref(), Some("new"));

    assert!(!state.finish_drain("new"), "a worker that was not draining is left to its deadline");
    assert!(state.finish_drain("old"));
    assert!(!state.worker_is_live("old", now, DEADLINE), "marked dead as soon as its stream ends");
    assert!(state.replicas.is_empty(), "it stopped its replicas before leaving");
    assert!(!state.has_draining_replica("llm"));
}

#[test]
fn a_worker_that_registers_while_draining_takes_no_work() {
    let mut state = State::default();
    let req =
        pb::RegisterRequest { worker_id: "w".into(), address: "http://w".into(), draining: true, ..Default::default() };
    state.register_worker(&req, Instant::now());
    assert!(state.worker_is_draining("w"));
    assert!(!state.worker_takes_work("w", Instant::now(), DEADLINE));
}

#[test]
fn load_counts_the_heads_requests_now_and_reported_load_only_beyond_them() {
    let mut state = State::default();
    register(&mut state, "w", "cpu", 0, vec![]);
    state.replicas.insert(ReplicaEntry::new("r".into(), "d".into(), "w".into(), Phase::Running));
    let beat = |running, waiting| pb::WorkerHeartbeat {
        worker_id: "w".into(),
        replicas: vec![pb::ReplicaStats { replica_id: "r".into(), running, waiting, ..Default::default() }],
        ..Default::default()
    };
    let in_flight = state.replicas["r"].in_flight.clone();
    in_flight.store(3, Ordering::Relaxed);
    state.record_heartbeat(&beat(3, 0), Instant::now()).unwrap();
    assert_eq!(state.replicas["r"].load(), 3, "the report holds the head's own three, counted once");
    in_flight.store(0, Ordering::Relaxed);
    assert_eq!(state.replicas["r"].load(), 0, "they finished: the report of them no longer counts");
    state.record_heartbeat(&beat(2, 3), Instant::now()).unwrap();
    assert_eq!(state.replicas["r"].load(), 5, "requests from elsewhere count");
    in_flight.store(1, Ordering::Relaxed);
    assert_eq!(state.replicas["r"].load(), 6);
}

#[test]
fn ongoing_requests_count_each_request_once_whether_running_queued_on_the_worker_or_at_the_head() {
    let mut state = State::default();
    state.set_deployments(vec![deployment("d", "m")]);
    register(&mut state, "w", "cpu", 0, vec![]);
    state.replicas.insert(ReplicaEntry::new("r".into(), "d".into(), "w".into(), Phase::Running));
    let (now, deadline) = (Instant::now(), Duration::from_secs(5));
    // The head dispatched 5: the worker runs 2 and queues 3 in its engine; 4 more wait at the
    // head for a replica.
    state.replicas["r"].in_flight.store(5, Ordering::Relaxed);
    let beat = pb::WorkerHeartbeat {
        worker_id: "w".into(),
        replicas: vec![pb::ReplicaStats { replica_id: "r".into(), running: 2, waiting: 3, ..Default::default() }],
        ..Default::default()
    };
    state.record_heartbeat(&beat, now).unwrap();
    state.deployment("d").expect("set").queued.store(4, Ordering::Relaxed);
    assert_eq!(
        state.ongoing_requests("d", now, deadline),
        9,
        "5 dispatched (the worker's 3 queued among them) + 4 waiting"
    );
    assert_eq!(state.ongoing_requests("other", now, deadline), 0);
}
