//! A simulated engine: the real worker service, node and registration over an engine that
//! computes nothing, so one process can stand for hundreds of workers when the head is measured
//! (`lumen bench head`, issue 20).
//!
//! What it owns: an actor answering the real engine's [`EngineMessage`]s, and one stepping task
//! per replica. It behaves like a continuous-batching engine with a fixed step time: at most
//! `max_num_seqs` requests run, the rest wait in arrival order; every step (`step` apart) gives
//! every running choice one token; a request ends with `length` at its `max_tokens` (the prompt
//! costs nothing; a continuation counts the output it brings). Its statistics are the real engine's: running and waiting counts, KV blocks in
//! use (prompt plus output per running request, in `block_size` blocks), token and request
//! totals, and the latency histograms, so heartbeats and `/metrics` carry what a loaded replica
//! would send.
//!
//! Invariants:
//! - Requests are validated by the real [`EngineLimits`] before they are queued (same errors).
//! - Each token's text is the wall-clock time it was sent, [`stamp`]ed (`<t` micros since the
//!   Unix epoch `>`), so a client on the same machine measures what lies between the worker and
//!   itself ([`stamps`] reads them back).
//! - The stepping task sleeps while nothing runs or waits; dropping a request's stream aborts it
//!   (the `RequestStream` contract) and stopping the actor ends every stream with "the engine
//!   stopped".

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::actor::{EngineHandle, EngineMessage, RequestStream};
use super::request::{ChoiceDelta, EngineEvent, EngineLimits, EngineRequest, FinishReason, RequestTimings, Usage};
use super::stats::{EngineHistograms, EngineStats, RateMeter};
use crate::grammar::{GrammarCompiler, GrammarLimits};
use crate::tokenizer::Tokenizer;
use crate::{Result, WorkerError};

/// How a simulated replica behaves beyond what its engine options say (`max_num_seqs`,
/// `block_size`, `max_model_len` and the scheduling policy come from them).
#[derive(Clone, Debug)]
pub struct SimulatedEngine {
    /// Time of one decode step (every running choice gets a token per step).
    pub step: Duration,
    /// KV blocks reported in total.
    pub kv_blocks: usize,
    /// The context length when the options give none.
    pub max_model_len: usize,
}

impl Default for SimulatedEngine {
    fn default() -> SimulatedEngine {
        SimulatedEngine { step: Duration::from_millis(5), kv_blocks: 65_536, max_model_len: 4096 }
    }
}

/// One replica's settings: the engine's, resolved against its options.
#[derive(Clone, Debug)]
struct SimSpec {
    step: Duration,
    kv_blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_model_len: usize,
}

/// `<t1733563000123456>`: `at` as microseconds since the Unix epoch.
pub fn stamp(at: SystemTime) -> String {
    format!("<t{}>", at.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros())
}

/// Every [`stamp`] in `text`, in order (microseconds since the Unix epoch).
pub fn stamps(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.split("<t").skip(1).filter_map(|rest| rest.split_once('>').and_then(|(n, _)| n.parse().ok()))
}

/// One request being simulated.
struct SimRequest {
    id: String,
    tx: mpsc::UnboundedSender<EngineEvent>,
    prompt_len: usize,
    /// Tokens each choice has (a continuation's output counts), and whether it is done.
    choices: Vec<(usize, bool)>,
    max_tokens: usize,
    arrival: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// What the actor and the stepping task share.
struct SimCore {
    spec: SimSpec,
    running: Vec<SimRequest>,
    waiting: VecDeque<SimRequest>,
    stats: EngineStats,
    prompt_rate: RateMeter,
    generation_rate: RateMeter,
    stopped: bool,
}

struct Shared {
    core: Mutex<SimCore>,
    work: Notify,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, SimCore> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SimCore {
    /// One step at `now`: admits waiting requests, gives every running choice a token, ends the
    /// finished and the abandoned. Returns whether work is left.
    fn step(&mut self, now: Instant, wall: SystemTime) -> bool {
        while self.running.len() < self.spec.max_num_seqs
            && let Some(mut req) = self.waiting.pop_front()
        {
            req.scheduled = Some(now);
            self.stats.prompt_tokens_total += req.prompt_len as u64;
            self.prompt_rate.add(now, req.prompt_len as u64);
            self.running.push(req);
        }
        let text = stamp(wall);
        let mut tokens = 0u64;
        let histograms = &mut self.stats.histograms;
        let mut finished = Vec::new();
        for (i, req) in self.running.iter_mut().enumerate() {
            let mut alive = true;
            for (index, (produced, done)) in req.choices.iter_mut().enumerate().filter(|(_, (_, done))| !*done) {
                *produced += 1;
                *done = *produced >= req.max_tokens;
                let delta = ChoiceDelta {
                    index,
                    text: text.clone(),
                    token_ids: vec![(*produced % 1000) as u32],
                    logprobs: Vec::new(),
                    finish_reason: done.then_some(FinishReason::Length),
                    stop_reason: None,
                };
                alive &= req.tx.send(EngineEvent::Delta(delta)).is_ok();
                tokens += 1;
            }
            match req.last_token {
                None => histograms.time_to_first_token.observe_duration(now.saturating_duration_since(req.arrival)),
                Some(previous) => {
                    histograms.inter_token_latency.observe_duration(now.saturating_duration_since(previous))
                }
            }
            req.first_token.get_or_insert(now);
            req.last_token = Some(now);
            if !alive {
                finished.push((i, FinishReason::Abort));
            } else if req.choices.iter().all(|&(_, done)| done) {
                finished.push((i, FinishReason::Length));
            }
        }
        self.stats.generation_tokens_total += tokens;
        self.generation_rate.add(now, tokens);
        for (i, reason) in finished.into_iter().rev() {
            let req = self.running.swap_remove(i);
            self.finish(req, now, reason);
        }
        self.stats.steps_total += 1;
        self.refresh(now);
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Ends `req`: its `Finished` event (when it ran to its end) and the counters.
    fn finish(&mut self, req: SimRequest, now: Instant, reason: FinishReason) {
        let total = now.saturating_duration_since(req.arrival);
        let queue = req.scheduled.unwrap_or(now).saturating_duration_since(req.arrival);
        let h = &mut self.stats.histograms;
        h.e2e_latency.observe_duration(total);
        h.queue_time.observe_duration(queue);
        h.prompt_tokens.observe(req.prompt_len as f64);
        let completion_tokens: usize = req.choices.iter().map(|&(produced, _)| produced).sum();
        h.generation_tokens.observe(completion_tokens as f64);
        match reason {
            FinishReason::Length => {
                self.stats.requests_finished_length += 1;
                let usage = Usage { prompt_tokens: req.prompt_len, completion_tokens, cached_tokens: 0 };
                let first_token = req.first_token.map(|t| t.saturating_duration_since(req.arrival));
                let timings = RequestTimings { queue, first_token, total };
                let _ = req.tx.send(EngineEvent::Finished { usage, timings });
            }
            FinishReason::Stop => self.stats.requests_finished_stop += 1,
            FinishReason::Abort => self.stats.requests_finished_abort += 1,
        }
    }

    /// Recomputes the load figures of the statistics.
    fn refresh(&mut self, now: Instant) {
        let block = self.spec.block_size.max(1);
        let used: usize = self
            .running
            .iter()
            .map(|r| r.choices.iter().map(|&(produced, _)| (r.prompt_len + produced).div_ceil(block)).sum::<usize>())
            .sum();
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.kv_blocks_used = used.min(self.stats.kv_blocks_total);
        self.stats.prompt_tokens_per_s = self.prompt_rate.rate(now);
        self.stats.generation_tokens_per_s = self.generation_rate.rate(now);
        self.stats.taken_at = Some(now);
    }

    fn abort(&mut self, id: &str, now: Instant) {
        let req = match self.running.iter().position(|r| r.id == id) {
            Some(i) => Some(self.running.swap_remove(i)),
            None => self.waiting.iter().position(|r| r.id == id).and_then(|i| self.waiting.remove(i)),
        };
        if let Some(req) = req {
            self.finish(req, now, FinishReason::Abort);
            self.refresh(now);
        }
    }
}

struct SimActor;

struct SimState {
    shared: Arc<Shared>,
    limits: EngineLimits,
    stepper: JoinHandle<()>,
}

struct SimArgs {
    spec: SimSpec,
    limits: EngineLimits,
}

impl Actor for SimActor {
    type Msg = EngineMessage;
    type State = SimState;
    type Arguments = SimArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: SimArgs) -> Result<SimState, ActorProcessingErr> {
        let mut stats = EngineStats {
            kv_blocks_total: args.spec.kv_blocks,
            histograms: EngineHistograms::new(args.spec.max_model_len),
            ..EngineStats::default()
        };
        stats.taken_at = Some(Instant::now());
        let window = Duration::from_secs(5);
        let core = SimCore {
            spec: args.spec,
            running: Vec::new(),
            waiting: VecDeque::new(),
            stats,
            prompt_rate: RateMeter::new(window),
            generation_rate: RateMeter::new(window),
            stopped: false,
        };
        let shared = Arc::new(Shared { core: Mutex::new(core), work: Notify::new() });
        let stepper = tokio::spawn(run_steps(Arc::clone(&shared)));
        Ok(SimState { shared, limits: args.limits, stepper })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: EngineMessage,
        state: &mut SimState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EngineMessage::Generate(req, reply) => {
                let _ = reply.send(submit(&me, state, *req));
            }
            EngineMessage::Abort(id) => state.shared.core().abort(&id, Instant::now()),
            EngineMessage::Stats(reply) => {
                let _ = reply.send(state.shared.core().stats.clone());
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<Self::Msg>, state: &mut SimState) -> Result<(), ActorProcessingErr> {
        state.stepper.abort();
        let mut core = state.shared.core();
        core.stopped = true;
        // Dropping the senders ends every stream with "the engine stopped".
        core.running.clear();
        core.waiting.clear();
        Ok(())
    }
}

fn submit(me: &ActorRef<EngineMessage>, state: &SimState, req: EngineRequest) -> Result<RequestStream> {
    state.limits.validate(&req)?;
    if req.pooling.is_some() {
        return Err(WorkerError::invalid("input", "a simulated replica does not pool"));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let sim = SimRequest {
        id: req.id.clone(),
        tx,
        prompt_len: req.prompt_token_ids.len(),
        // A continuation (a request moved off a failed replica) goes on from each choice's output
        // so far; its finished choices stay finished.
        choices: (0..req.n).map(|i| req.resumed.get(i).map_or((0, false), |c| (c.output.len(), c.finished))).collect(),
        max_tokens: req.stop.max_tokens.max(1),
        arrival: req.arrival,
        scheduled: None,
        first_token: None,
        last_token: None,
    };
    {
        let mut core = state.shared.core();
        if core.stopped {
            return Err(WorkerError::EngineStopped);
        }
        core.waiting.push_back(sim);
        core.stats.waiting = core.waiting.len();
        // Fresh statistics with the new work, as the real engine publishes when it wakes: a
        // snapshot left from an idle spell would read as a stall to a health check.
        core.stats.taken_at = Some(Instant::now());
    }
    state.shared.work.notify_one();
    Ok(RequestStream::new(req.id, rx, me.clone()))
}

/// Steps every `step` while there is work; sleeps until a request arrives otherwise.
async fn run_steps(shared: Arc<Shared>) {
    let step = shared.core().spec.step.max(Duration::from_micros(100));
    loop {
        let idle = {
            let core = shared.core();
            core.running.is_empty() && core.waiting.is_empty()
        };
        if idle {
            shared.work.notified().await;
        }
        let mut next = tokio::time::Instant::now() + step;
        loop {
            tokio::time::sleep_until(next).await;
            next += step;
            let more = shared.core().step(Instant::now(), SystemTime::now());
            if !more {
                break;
            }
        }
    }
}

/// Process-wide tokenizers of simulated replicas, by model source: hundreds of replicas of one
/// model share one.
#[derive(Clone, Default)]
pub struct SimTokenizers(Arc<Mutex<HashMap<String, Tokenizer>>>);

impl SimTokenizers {
    /// The tokenizer of `model` (a GGUF file or a model directory), read once (blocking: the
    /// lock is held while it loads, so a hundred replicas starting at once wait for one read
    /// instead of each reading it).
    pub fn get(&self, opts: &super::EngineOptions) -> Result<Tokenizer> {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = cache.get(&opts.model) {
            return Ok(t.clone());
        }
        let location = crate::model::location::resolve_model(&opts.model, opts.load_format)?;
        let (_, tokenizer, _) = super::load::open_model(&location, opts)?;
        cache.insert(opts.model.clone(), tokenizer.clone());
        Ok(tokenizer)
    }
}

impl SimulatedEngine {
    /// Starts a simulated replica serving `opts` (its `max_model_len`, `max_num_seqs`,
    /// `block_size` and scheduling policy; its model only for the tokenizer).
    pub async fn start(
        &self,
        opts: &super::EngineOptions,
        tokenizer: Tokenizer,
        name: &str,
    ) -> Result<(EngineHandle, JoinHandle<()>)> {
        let spec = SimSpec {
            step: self.step,
            kv_blocks: self.kv_blocks,
            block_size: opts.block_size.max(1),
            max_num_seqs: opts.max_num_seqs.max(1),
            max_model_len: opts.max_model_len.unwrap_or(self.max_model_len),
        };
        let limits = EngineLimits {
            vocab_size: tokenizer.vocab_size(),
            max_model_len: spec.max_model_len,
            cache_capacity_tokens: spec.kv_blocks * spec.block_size,
            priority_scheduling: opts.scheduling_policy == super::options::SchedulingPolicy::Priority,
        };
        let grammars = Arc::new(GrammarCompiler::new(tokenizer.clone(), limits.vocab_size, GrammarLimits::default()));
        let description = format!("simulated engine ({} ms steps)", spec.step.as_secs_f64() * 1e3);
        let (actor, join) = Actor::spawn(None, SimActor, SimArgs { spec, limits: limits.clone() })
            .await
            .map_err(|e| WorkerError::Engine(format!("cannot start the simulated engine `{name}`: {e}")))?;
        Ok((EngineHandle::from_parts(actor, tokenizer, limits, description.into(), grammars), join))
    }
}

#[cfg(test)]
#[path = "simulated_tests.rs"]
mod tests;
