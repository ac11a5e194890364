//! The router: [`Backend`] for [`Cluster`]. Picks a replica of the requested model (prefix
//! affinity, else power of two choices on load) and forwards the request to its worker over gRPC.
//!
//! Contract:
//! - Load of a replica = requests the head has in flight on it now + the running and waiting
//!   requests it last reported beyond the head's own at that moment (`ReplicaEntry::load`). Of
//!   two distinct random routable replicas, the less loaded wins,
//!   unless a replica that served the prompt's prefix can take it ([`super::affinity`]).
//! - A replica with `max_ongoing_requests` head-side requests in flight takes no more (a request
//!   carrying a tenant, sent under the fair queue policy, also the fair headroom beyond it:
//!   [`fair_headroom`], the admission gate's room for a tenant under its share); when every
//!   replica is full the request is refused as `Overloaded`.
//! - A model with no running replica: unknown models are `ModelNotFound` at once. Otherwise the
//!   request waits (up to `replica_wait_timeout_s`, polling the state) while a replica of the
//!   deployment is starting or the deployment has not said why it has none (the controller is
//!   about to place one). A deployment with a `message` and nothing starting (UNHEALTHY: failed
//!   starts, no worker, no room) answers `Unavailable` with that message at once, except while a
//!   restored head waits for its workers to register again ([`Cluster::expect_workers_back`]):
//!   then it waits too. Dropping the request (a client gone) stops the wait.
//! - A replica on a draining worker is not routable; its replacement is placed at once, and a
//!   request finding no other replica waits for it like for any starting replica.
//! - A call that fails before its first event is retried once on another replica (not when the
//!   replica rejected the request as invalid: another would too); when there is none, the retry
//!   waits only while a replica is starting, one is draining (its replacement is coming) or
//!   workers are expected back, and fails at once otherwise. After the first event, failures
//!   become an `Err` item and end the stream, as does a stream that ends without `finished` or
//!   one from a worker marked dead that stays silent ([`super::forward`]); the wait for the first
//!   event ends the same way.
//! - `generate_avoiding` never picks a replica it is told to avoid (one that failed the request
//!   being migrated, `api::generate::migration`); with no other replica it answers as a retry does.
//! - Dropping the returned stream drops the gRPC call, which cancels it on the worker.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use pb::worker_client::WorkerClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::affinity::{self, PrefixAffinity, PrefixKeys};
use super::forward::{self, InFlight, SILENT_STREAM_GRACE, WorkerSilence, forward_events};
use super::registry::{DeploymentEntry, Phase, ReplicaEntry, State};
use super::replica_client::status_to_error;
use super::{Cluster, random_u64};
use crate::backend::{Backend, BackendError, EventStream, ModelCard, Runner, fair_headroom};

/// Timeout of the unary calls (`Tokenize`, `Detokenize`).
const UNARY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a request waiting for a replica looks at the state again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Why no replica was picked.
enum Unroutable {
    /// The answer to give now.
    Refused(BackendError),
    /// Nothing runs yet, but a replica is starting or about to be placed.
    Pending,
}

/// A chosen replica and how to reach it.
struct Pick {
    deployment: String,
    replica_id: String,
    worker_id: String,
    address: String,
    in_flight: Arc<AtomicU32>,
    silence: WorkerSilence,
}

/// Index of the less loaded of two distinct entries of `loads` drawn from `random`.
fn power_of_two_choices(loads: &[u64], random: u64) -> usize {
    let n = loads.len();
    if n < 2 {
        return 0;
    }
    let first = (random % n as u64) as usize;
    let mut second = ((random >> 32) % (n as u64 - 1)) as usize;
    if second >= first {
        second += 1;
    }
    if loads[second] < loads[first] { second } else { first }
}

fn retryable(error: &BackendError) -> bool {
    !matches!(error, BackendError::InvalidRequest { .. })
}

/// Why `deployment` has no routable replica: worth waiting while a replica is starting or the
/// controller has not given a reason (it is placing one); refused with the reason otherwise.
fn why_none_runs(
    state: &State,
    deployment: &DeploymentEntry,
    model: &str,
    now: Instant,
    deadline: Duration,
) -> Unroutable {
    let waiting = replica_starting(state, deployment, now, deadline) || workers_expected_back(state, now);
    match &deployment.message {
        Some(message) if !waiting => {
            Unroutable::Refused(BackendError::Unavailable(format!("`{model}` has no running replica: {message}")))
        }
        _ => Unroutable::Pending,
    }
}

/// Whether a retry that found no other replica should wait: a replica of `deployment` is
/// starting, one sits on a draining worker (the controller is placing its replacement), or a
/// restored head expects its workers back. Otherwise the replica that failed was the only one
/// and nothing is on its way.
fn replacement_coming(state: &State, deployment: &DeploymentEntry, now: Instant, deadline: Duration) -> bool {
    replica_starting(state, deployment, now, deadline)
        || (deployment.message.is_none() && state.has_draining_replica(&deployment.spec.name))
        || workers_expected_back(state, now)
}

/// A replica of `deployment` on a live worker is starting.
fn replica_starting(state: &State, deployment: &DeploymentEntry, now: Instant, deadline: Duration) -> bool {
    state.live_replicas(&deployment.spec.name, now, deadline).any(|r| r.phase == Phase::Starting)
}

/// A restored head is still waiting for its workers to register again.
fn workers_expected_back(state: &State, now: Instant) -> bool {
    state.rejoin_until.is_some_and(|until| now < until)
}

/// A request waiting at the head for a replica of its deployment; counted until dropped.
struct QueuedRequest(Arc<AtomicU32>);

impl QueuedRequest {
    fn new(counter: &Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        QueuedRequest(counter.clone())
    }
}

impl Drop for QueuedRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// Chooses a routable replica of `model` that is not in `exclude`, preferring the one that
    /// served the longest of `keys` (see [`affinity`]), and remembers the choice under `keys`.
    fn pick(&self, model: &str, exclude: &[String], keys: &PrefixKeys, tenanted: bool) -> Result<Pick, Unroutable> {
        let state = self.state();
        let deployment = state
            .deployment_for_model(model)
            .ok_or_else(|| Unroutable::Refused(BackendError::ModelNotFound(model.into())))?;
        let name = deployment.spec.name.as_str();
        let cap = deployment.spec.max_ongoing_requests;
        let (now, deadline) = (Instant::now(), self.settings().heartbeat_deadline());
        let routable: Vec<&ReplicaEntry> =
            state.routable_replicas(name, now, deadline).filter(|r| !exclude.contains(&r.id)).collect();
        if routable.is_empty() {
            if !exclude.is_empty() && !replacement_coming(&state, deployment, now, deadline) {
                return Err(Unroutable::Refused(BackendError::NoReplica(model.into())));
            }
            return Err(why_none_runs(&state, deployment, model, now, deadline));
        }
        // The admission gate keeps the model within `cap` except for its fair headroom, which
        // only requests carrying a tenant (sent under the fair queue policy) may have used.
        let room = if tenanted { cap.saturating_add(fair_headroom(cap as usize) as u32) } else { cap };
        let open: Vec<&ReplicaEntry> =
            routable.into_iter().filter(|r| cap == 0 || r.in_flight.load(Ordering::Relaxed) < room).collect();
        if open.is_empty() {
            let message = format!("every replica of `{model}` has {room} requests in flight");
            return Err(Unroutable::Refused(BackendError::Overloaded(message)));
        }
        let loads: Vec<u64> = open.iter().map(|r| r.load()).collect();
        let mut hints = self.affinity();
        let affine = hints.lookup(name, keys, |id| open.iter().position(|r| r.id == id));
        let index = affinity::prefer(affine, &loads).unwrap_or_else(|| power_of_two_choices(&loads, random_u64()));
        let chosen = open[index];
        hints.remember(name, keys, &chosen.id);
        if hints.deployment_count() > state.deployments().count() {
            hints.retain_deployments(|d| state.deployment(d).is_some());
        }
        let worker = state.workers.get(&chosen.worker_id);
        let address = worker.map(|w| w.address.clone()).unwrap_or_default();
        // A worker without an entry cannot be marked silent: its receiver just never fires.
        let receiver = worker.map_or_else(|| watch::channel(false).1, |w| w.silent.subscribe());
        Ok(Pick {
            deployment: name.to_string(),
            replica_id: chosen.id.clone(),
            worker_id: chosen.worker_id.clone(),
            address,
            in_flight: chosen.in_flight.clone(),
            silence: WorkerSilence { receiver, grace: deadline.max(SILENT_STREAM_GRACE) },
        })
    }

    /// [`Self::pick`], waiting while the deployment is bringing a replica up (on a retry, with
    /// `exclude` set, only while a replacement is coming: see [`replacement_coming`]).
    async fn pick_or_wait(
        &self,
        model: &str,
        exclude: &[String],
        keys: &PrefixKeys,
        tenanted: bool,
    ) -> Result<Pick, BackendError> {
        let timeout = Duration::from_secs(self.settings().replica_wait_timeout_s);
        let give_up = tokio::time::Instant::now() + timeout;
        let mut waiting = false;
        // Counted as the deployment's load while it waits (see `State::ongoing_requests`).
        let mut _queued = None;
        loop {
            match self.pick(model, exclude, keys, tenanted) {
                Ok(pick) => {
                    if waiting {
                        tracing::debug!(model, replica = %pick.replica_id, "a replica became routable");
                    }
                    return Ok(pick);
                }
                Err(Unroutable::Refused(error)) => return Err(error),
                Err(Unroutable::Pending) if tokio::time::Instant::now() >= give_up => {
                    if waiting {
                        tracing::warn!(model, ?timeout, "no replica became routable in time");
                    }
                    return Err(BackendError::NoReplica(model.into()));
                }
                Err(Unroutable::Pending) => {
                    if !waiting {
                        tracing::debug!(model, "no replica runs yet; waiting for one");
                        waiting = true;
                        _queued = self.state().deployment_for_model(model).map(|d| QueuedRequest::new(&d.queued));
                    }
                    tokio::time::sleep_until(give_up.min(tokio::time::Instant::now() + WAIT_POLL)).await;
                }
            }
        }
    }

    fn affinity(&self) -> MutexGuard<'_, PrefixAffinity> {
        self.inner.affinity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn client(&self, pick: &Pick) -> Result<WorkerClient<Channel>, BackendError> {
        self.inner
            .clients
            .client(&pick.worker_id, &pick.address)
            .map_err(|e| BackendError::Unavailable(format!("worker `{}` has an unusable address: {e}", pick.worker_id)))
    }

    /// Starts `request` on `pick` and waits for its first event.
    async fn open_stream(&self, mut pick: Pick, mut request: pb::GenerateRequest) -> Result<EventStream, BackendError> {
        let guard = InFlight::new(pick.in_flight.clone());
        request.replica_id = pick.replica_id.clone();
        let mut client = self.client(&pick)?;
        let mut request = tonic::Request::new(request);
        // The request's span, when tracing is on (see `dispatch::start`), continues on the worker.
        lumen_proto::otel::inject(&opentelemetry::Context::current(), request.metadata_mut());
        let mut events = client.generate(request).await.map_err(|s| status_to_error(&s))?.into_inner();
        let Some(first) = forward::next_event(&mut events, &mut pick.silence, &pick.worker_id).await? else {
            return Err(BackendError::Unavailable(format!(
                "replica `{}` ended the request before any event",
                pick.replica_id
            )));
        };
        crate::backend::note_route(&pick.deployment, &pick.replica_id);
        Ok(forward_events(first, events, pick.silence, guard, pick.worker_id, pick.replica_id))
    }

    /// Runs a unary call on a replica of `model`, retrying once on another replica.
    async fn unary<T, F, Fut>(&self, model: &str, call: F) -> Result<T, BackendError>
    where
        F: Fn(WorkerClient<Channel>, String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut tried = Vec::new();
        let mut last_error = None;
        for _ in 0..2 {
            let pick = match self.pick_or_wait(model, &tried, &PrefixKeys::new(), false).await {
                Ok(pick) => pick,
                Err(e) => return Err(last_error.unwrap_or(e)),
            };
            tried.push(pick.replica_id.clone());
            let result = match tokio::time::timeout(UNARY_TIMEOUT, call(self.client(&pick)?, pick.replica_id)).await {
                Ok(result) => result.map(tonic::Response::into_inner).map_err(|s| status_to_error(&s)),
                Err(_) => Err(BackendError::Unavailable(format!("no answer within {UNARY_TIMEOUT:?}"))),
            };
            match result {
                Err(e) if retryable(&e) => last_error = Some(e),
                other => return other,
            }
        }
        Err(last_error.unwrap_or_else(|| BackendError::NoReplica(model.into())))
    }
}

#[async_trait::async_trait]
impl Backend for Cluster {
    fn models(&self) -> Vec<ModelCard> {
        let state = self.state();
        let now = Instant::now();
        let deadline = self.settings().heartbeat_deadline();
        state
            .deployments()
            .map(|d| ModelCard {
                id: d.spec.model_name.clone(),
                max_model_len: state
                    .routable_replicas(&d.spec.name, now, deadline)
                    .filter_map(|r| r.info.as_ref().map(|i| i.max_model_len))
                    .max()
                    .unwrap_or(0),
                created: d.created_unix_s,
                owned_by: "lumen".into(),
                runner: Runner::of_options_json(&d.spec.engine_options_json),
            })
            .collect()
    }

    fn ready(&self) -> bool {
        let state = self.state();
        let now = Instant::now();
        let deadline = self.settings().heartbeat_deadline();
        state.deployments().any(|d| state.routable_replicas(&d.spec.name, now, deadline).next().is_some())
    }

    async fn generate(&self, model: &str, request: pb::GenerateRequest) -> Result<EventStream, BackendError> {
        self.generate_avoiding(model, request, &[]).await
    }

    async fn generate_avoiding(
        &self,
        model: &str,
        request: pb::GenerateRequest,
        avoid: &[String],
    ) -> Result<EventStream, BackendError> {
        let keys = affinity::prefix_keys(&request);
        let tenanted = !request.tenant.is_empty();
        let mut tried = avoid.to_vec();
        let mut last_error = None;
        for _ in 0..2 {
            let pick = match self.pick_or_wait(model, &tried, &keys, tenanted).await {
                Ok(pick) => pick,
                Err(e) => return Err(last_error.unwrap_or(e)),
            };
            let replica_id = pick.replica_id.clone();
            tried.push(replica_id.clone());
            match self.open_stream(pick, request.clone()).await {
                Err(e) if retryable(&e) => {
                    tracing::warn!(request_id = %request.request_id, replica = %replica_id, error = %e,
                        "generate failed before its first event");
                    last_error = Some(e);
                }
                other => return other,
            }
        }
        Err(last_error.unwrap_or_else(|| BackendError::NoReplica(model.into())))
    }

    async fn tokenize(&self, model: &str, request: pb::TokenizeRequest) -> Result<pb::TokenizeReply, BackendError> {
        self.unary(model, |mut client, replica_id| {
            let request = pb::TokenizeRequest { replica_id, ..request.clone() };
            async move { client.tokenize(request).await }
        })
        .await
    }

    async fn detokenize(
        &self,
        model: &str,
        request: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeReply, BackendError> {
        self.unary(model, |mut client, replica_id| {
            let request = pb::DetokenizeRequest { replica_id, ..request.clone() };
            async move { client.detokenize(request).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_choices_takes_the_less_loaded_of_the_two_drawn() {
        for random in [0u64, 1, 7, 1 << 32, (3 << 32) + 1, u64::MAX] {
            assert_eq!(power_of_two_choices(&[5, 1], random), 1);
            assert_eq!(power_of_two_choices(&[0, 9], random), 0);
        }
    }

    #[test]
    fn power_of_two_choices_draws_two_distinct_replicas() {
        // Loads are all equal except the one drawn second, so a draw of the same index twice
        // would return `first` even though `second` is less loaded.
        for random in 0..64u64 {
            let random = random | (random << 32);
            let first = (random % 3) as usize;
            let mut loads = vec![5u64; 3];
            for (i, load) in loads.iter_mut().enumerate() {
                if i != first {
                    *load = 1;
                }
            }
            assert_ne!(power_of_two_choices(&loads, random), first);
        }
    }

    const DEADLINE: Duration = Duration::from_secs(3);

    /// A state with deployment `llm` (model `m`) whose one running replica is on worker `w`.
    fn one_replica_on(draining: bool) -> State {
        let mut state = State::default();
        let spec = super::super::Deployment {
            name: "llm".into(),
            model_name: "m".into(),
            ..super::super::Deployment::default()
        };
        state.set_deployments(vec![spec]);
        let replica = pb::ReplicaInfo {
            replica_id: "llm-00000001".into(),
            model_name: "m".into(),
            state: pb::ReplicaState::Running as i32,
            ..Default::default()
        };
        let req = pb::RegisterRequest {
            worker_id: "w".into(),
            address: "http://w".into(),
            replicas: vec![replica],
            draining,
            ..Default::default()
        };
        state.register_worker(&req, Instant::now());
        state
    }

    fn set_message(state: &mut State, message: &str) {
        if let Some(d) = state.deployment_mut("llm") {
            d.message = Some(message.into());
        }
    }

    #[test]
    fn a_retry_waits_only_while_a_replacement_is_coming() {
        let now = Instant::now();
        let state = one_replica_on(false);
        let d = state.deployment("llm").expect("deployed");
        assert!(!replacement_coming(&state, d, now, DEADLINE), "the failed replica was the only one");
        let state = one_replica_on(true);
        let d = state.deployment("llm").expect("deployed");
        assert!(replacement_coming(&state, d, now, DEADLINE), "its worker drains: a replacement is being placed");
        assert!(matches!(why_none_runs(&state, d, "m", now, DEADLINE), Unroutable::Pending));
    }

    #[test]
    fn a_restored_head_waits_for_its_workers_instead_of_refusing() {
        let now = Instant::now();
        let mut state = State::default();
        state.set_deployments(vec![super::super::Deployment {
            name: "llm".into(),
            model_name: "m".into(),
            ..super::super::Deployment::default()
        }]);
        set_message(&mut state, "waiting for capacity: 0 of 1 replicas placed; no live worker is registered");
        let d = state.deployment("llm").expect("deployed");
        assert!(matches!(why_none_runs(&state, d, "m", now, DEADLINE), Unroutable::Refused(_)));
        state.rejoin_until = Some(now + Duration::from_secs(5));
        let d = state.deployment("llm").expect("deployed");
        assert!(matches!(why_none_runs(&state, d, "m", now, DEADLINE), Unroutable::Pending));
        assert!(replacement_coming(&state, d, now, DEADLINE));
        let after = now + Duration::from_secs(6);
        assert!(matches!(why_none_runs(&state, d, "m", after, DEADLINE), Unroutable::Refused(_)), "the grace ends");
    }
}
