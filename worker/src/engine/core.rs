//! The engine's step logic, single-threaded and synchronous: intake, scheduling, the forward pass,
//! sampling, detokenizing, stop checks and output events. The engine thread drives it. Pooling
//! (embedding) requests take the same path up to the forward pass and end there (`core_pool.rs`).
//!
//! Metrics are recorded where the events happen: time to first token and the request's prompt
//! tokens when its first token is sampled, every inter-token gap of a sequence when its next
//! token is sampled, and end-to-end latency, queue time and the request's token counts when its
//! last choice finishes (any finish reason).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::phases::{StepMarks, StepPhases};
use super::request::{ChoiceDelta, EngineEvent, EngineLimits, EngineRequest, FinishReason, StopReason, TokenLogprob};
use super::stats::{EngineHistograms, EngineStats, RateMeter};
use super::step_cost::StepCostModel;
use crate::Result;
use crate::TokenId;
use crate::grammar::{Feed, GrammarCompiler, GrammarLimits, MaskWorkers, SeqGrammar};
use crate::kv_cache::BlockHash;
use crate::model::Model;
use crate::sampling::reduce::{Reduced, ReducedRows, RowPlan, RowResult};
use crate::sampling::{Sampled, SamplingParams, SequenceSampler, StopParams};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulingPolicy, SeqId, Sequence};
use crate::spec::SpecSettings;
use crate::spec::adaptive::{Acceptance, Controller};
use crate::tokenizer::{IncrementalDetokenizer, StopOutcome, StopStringMatcher, Tokenizer};

#[path = "core_deferred.rs"]
mod deferred;
#[path = "core_finish.rs"]
mod finish;
use finish::drain_text;
#[path = "core_grammar.rs"]
mod grammar;
#[path = "core_pool.rs"]
mod pool;
#[path = "core_prompt.rs"]
mod prompt;
#[path = "core_reduce.rs"]
mod reduce;
#[path = "core_resume.rs"]
mod resume;
#[path = "core_spec.rs"]
mod spec;

struct RequestState {
    tx: UnboundedSender<EngineEvent>,
    sampling: SamplingParams,
    stop: StopParams,
    n: usize,
    prompt_len: usize,
    live: Vec<SeqId>,
    forked: bool,
    completion_tokens: usize,
    cached_tokens: usize,
    arrival: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    /// Prompt log-probabilities gathered while the prefill runs; taken when sent.
    prompt_logprobs: Option<prompt::Gathering>,
    /// A pooling request's vector while its prefill runs (`core_pool.rs`); taken when sent.
    pooled: Option<super::pooling::PoolAccumulator>,
}

struct SeqState {
    request: String,
    index: usize,
    sampler: SequenceSampler,
    detok: IncrementalDetokenizer,
    stop: StopStringMatcher,
    generated: usize,
    /// When this sequence's previous token was sampled (for inter-token latency).
    last_token_at: Option<Instant>,
    /// The structured-output matcher and next-token mask (`core_grammar.rs`).
    grammar: Option<SeqGrammar>,
    /// How well its speculative drafts fare (`spec::adaptive`).
    acceptance: Acceptance,
}

impl SeqState {
    /// A generated token's text: through the detokenizer, then (once `past_min`) the stop-string
    /// matcher, which may hold some back or end the choice.
    fn push_text(&mut self, tokenizer: &Tokenizer, token: TokenId, past_min: bool) -> StopOutcome {
        let piece = self.detok.push(tokenizer, token).unwrap_or_default();
        match past_min {
            true => self.stop.push(&piece),
            false => StopOutcome { emit: piece, stopped: false, matched: None },
        }
    }
}

/// The delta's log-probability entry of a sampled `token` (empty when the request asked for none).
fn token_logprobs(
    tokenizer: &Tokenizer,
    token: TokenId,
    logprobs: Option<(f32, &[(TokenId, f32)])>,
) -> Vec<TokenLogprob> {
    match logprobs {
        Some((logprob, top)) => vec![TokenLogprob {
            token,
            piece: tokenizer.token_piece(token),
            logprob,
            top: top.iter().map(|&(t, lp)| (t, tokenizer.token_piece(t), lp)).collect(),
            rank: 0,
        }],
        None => Vec::new(),
    }
}

/// Engine state: model, tokenizer, scheduler and the live requests.
pub struct EngineCore {
    model: Box<dyn Model>,
    tokenizer: Tokenizer,
    scheduler: Scheduler,
    limits: EngineLimits,
    requests: HashMap<String, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    counters: EngineStats,
    prompt_rate: RateMeter,
    generation_rate: RateMeter,
    last_progress: Instant,
    /// The step's row plans (`core_reduce.rs`) and the rows the model returned.
    plans: Vec<RowPlan>,
    reduced: ReducedRows,
    /// Structured outputs: the replica's compiler (shared with the service) and the threads that
    /// compute masks while the forward pass runs.
    grammars: Arc<GrammarCompiler>,
    mask_workers: MaskWorkers,
    /// Measured step costs, which size the prompt chunks of steps that carry decodes.
    step_cost: StepCostModel,
    /// Where the engine thread's time goes (`phases`).
    phases: StepPhases,
    /// Tokens of the last step whose output is sent while the next step runs (`core_deferred.rs`).
    deferred: deferred::DeferredOutputs,
    /// False with `LUMEN_DEFER_OUTPUT=0` (every token's output is sent in its own step; a
    /// diagnostic, to measure what deferring buys).
    defer_output: bool,
    /// Speculative decoding's settings (`None`: off) and the proposer's reused buffers
    /// (`core_spec.rs`).
    spec: Option<SpecSettings>,
    spec_control: Controller,
    spec_running: Vec<SeqId>,
    spec_tokens: Vec<TokenId>,
    /// The draft model (`draft_model`), its asks and its proposals.
    draft: Option<crate::spec::draft_model::DraftModel>,
    spec_asks: Vec<(SeqId, usize)>,
    spec_drafts: Vec<Vec<TokenId>>,
}

/// Scheduling knobs of an engine.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// The step-time goal of steps that carry decodes, ms (`None`: prompt chunks fill the
    /// budget); see `step_cost`.
    pub itl_goal_ms: Option<f64>,
    /// The prompt pressure at which the goal's limit binds (0: always); see `step_cost`.
    pub itl_goal_min_pressure: f64,
    pub scheduling_policy: SchedulingPolicy,
    /// Speculative decoding (`None`: off).
    pub speculative: Option<SpecSettings>,
}

impl EngineCore {
    pub fn new(model: Box<dyn Model>, tokenizer: Tokenizer, cfg: &CoreConfig) -> EngineCore {
        let sched_cfg = SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            block_size: model.block_size(),
            num_blocks: model.num_blocks(),
            enable_prefix_caching: cfg.enable_prefix_caching,
            policy: cfg.scheduling_policy,
        };
        let limits = EngineLimits {
            vocab_size: model.config().vocab_size,
            max_model_len: cfg.max_model_len,
            cache_capacity_tokens: model.num_blocks() * model.block_size(),
            priority_scheduling: cfg.scheduling_policy == SchedulingPolicy::Priority,
        };
        let window = Duration::from_secs(5);
        let grammars = Arc::new(GrammarCompiler::new(tokenizer.clone(), limits.vocab_size, GrammarLimits::default()));
        EngineCore {
            model,
            tokenizer,
            scheduler: Scheduler::new(sched_cfg),
            limits,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            counters: EngineStats { histograms: EngineHistograms::new(cfg.max_model_len), ..EngineStats::default() },
            prompt_rate: RateMeter::new(window),
            generation_rate: RateMeter::new(window),
            last_progress: Instant::now(),
            plans: Vec::new(),
            reduced: ReducedRows::default(),
            grammars,
            mask_workers: MaskWorkers::new(MaskWorkers::default_threads()),
            step_cost: StepCostModel::new(cfg.itl_goal_ms, cfg.itl_goal_min_pressure),
            phases: StepPhases::default(),
            deferred: deferred::DeferredOutputs::default(),
            defer_output: std::env::var("LUMEN_DEFER_OUTPUT").map_or(true, |v| v != "0"),
            spec: cfg.speculative,
            spec_control: Controller::new(cfg.speculative.map_or(0, |s| s.num_tokens)),
            spec_running: Vec::new(),
            spec_tokens: Vec::new(),
            draft: None,
            spec_asks: Vec::new(),
            spec_drafts: Vec::new(),
        }
    }

    /// The replica's structured-output compiler.
    pub fn grammars(&self) -> &Arc<GrammarCompiler> {
        &self.grammars
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || !self.deferred.is_empty()
    }

    /// Sends the deferred output of the last step (before anything else goes out for its
    /// requests, or when no step follows).
    fn flush_deferred(&mut self) {
        self.deferred.flush(&mut self.seqs, &self.requests, &self.tokenizer);
    }

    /// Queues a request; its events go to `tx`. Invalid requests get one `Failed` event.
    pub fn add_request(&mut self, req: EngineRequest, tx: UnboundedSender<EngineEvent>) {
        if let Err(e) = self.limits.validate(&req) {
            let _ = tx.send(EngineEvent::Failed(e.to_string()));
            return;
        }
        if self.requests.contains_key(&req.id) {
            let _ = tx.send(EngineEvent::Failed(format!("a request with id `{}` is already running", req.id)));
            return;
        }
        // One sequence for a new request (its siblings fork at the first token), one per
        // unfinished choice for a resumed one; all queued in the request's arrival order.
        let priority = self.next_seq;
        let (mut live, mut pooled) = (Vec::new(), None);
        for (index, output) in req.choices_to_run() {
            let seq_id = self.next_seq;
            self.next_seq += 1;
            let sampler =
                SequenceSampler::new(&req.sampling, index as u64, &req.prompt_token_ids, self.limits.vocab_size);
            let grammar = req.constraint.as_deref().map(|c| self.start_grammar(c, req.constraint_after.as_deref()));
            let mut state = SeqState {
                request: req.id.clone(),
                index,
                sampler,
                detok: IncrementalDetokenizer::with_prompt(&req.prompt_token_ids, req.skip_special_tokens),
                stop: StopStringMatcher::new(req.stop.stop.clone(), req.stop.include_stop_str_in_output),
                generated: 0,
                last_token_at: None,
                grammar,
                acceptance: Acceptance::default(),
            };
            if let Err(message) = self.replay_output(&mut state, &req, &output) {
                for s in &live {
                    self.seqs.remove(s);
                    self.scheduler.remove(*s);
                }
                tracing::warn!(request_id = %req.id, %message, "resumed request refused");
                let _ = tx.send(EngineEvent::Failed(message));
                return;
            }
            self.seqs.insert(seq_id, state);
            let mut seq = Sequence::new(seq_id, priority, [req.prompt_token_ids.as_slice(), &output].concat());
            seq.priority.0 = req.priority;
            seq.salt = req.cache_salt.as_deref().map(BlockHash::of_salt);
            seq.tenant = req.tenant.clone();
            seq.tenant_weight = req.tenant_weight;
            if live.is_empty() {
                seq.prompt_logprobs = req.prompt_logprobs.is_some();
                pooled = self.start_pooling(&req, &mut seq);
            }
            self.scheduler.add(seq);
            live.push(seq_id);
        }
        let prompt_logprobs = self.start_prompt_logprobs(&req, &tx);
        let (forked, completion_tokens) = (req.n == 1 || !req.resumed.is_empty(), req.resumed_tokens());
        self.requests.insert(
            req.id.clone(),
            RequestState {
                tx,
                sampling: req.sampling,
                stop: req.stop,
                n: req.n,
                prompt_len: req.prompt_token_ids.len(),
                live,
                forked,
                completion_tokens,
                cached_tokens: 0,
                arrival: req.arrival,
                scheduled_at: None,
                first_token_at: None,
                prompt_logprobs,
                pooled,
            },
        );
    }

    /// Runs one step. Returns false when there was nothing to run.
    pub fn step(&mut self) -> Result<bool> {
        self.drop_disconnected();
        let started = Instant::now();
        self.propose_drafts()?;
        let drafted = Instant::now();
        let cost = &self.step_cost;
        let schedule = self.scheduler.schedule_limited(|decodes| cost.prompt_limit(decodes));
        self.counters.preemptions_total += schedule.preempted.len() as u64;
        if schedule.is_empty() {
            self.flush_deferred();
            return Ok(false);
        }
        let now = Instant::now();
        for item in &schedule.seqs {
            if let Some(req) = self.seqs.get(&item.id).and_then(|s| self.requests.get_mut(&s.request))
                && req.scheduled_at.is_none()
            {
                req.scheduled_at = Some(now);
            }
        }
        self.draft_prefill(&schedule);
        let batch = self.scheduler.build_batch(&schedule);
        self.plan_rows(&schedule);
        self.plan_prompt_rows(&schedule);
        let forward_start = Instant::now();
        // The last step's deferred output is sent while the device runs this one.
        let (seqs, requests, tokenizer, deferred) =
            (&mut self.seqs, &self.requests, &self.tokenizer, &mut self.deferred);
        self.model.forward_overlapped(&batch, &self.plans, &mut self.reduced, &mut || {
            deferred.flush(seqs, requests, tokenizer)
        })?;
        let forward_end = Instant::now();
        self.scheduler.complete(&schedule);
        self.count_prompt_tokens(&schedule, now);
        let mut reduced = std::mem::take(&mut self.reduced);
        self.take_prompt_rows(&schedule, &reduced, Self::sampling_rows(&schedule));
        self.take_hidden_rows(&schedule);
        let mut rows = 0;
        for item in schedule.seqs.iter().filter(|s| s.samples) {
            let (seq, first) = (item.id, rows);
            rows += 1 + item.draft;
            if item.draft > 0 {
                if reduced.rows.len() < rows {
                    break;
                }
                self.verify_draft(seq, item.draft, first, &mut reduced);
                continue;
            }
            let Some(row) = reduced.rows.get(first) else { break };
            match row {
                RowResult::Full(range) => self.sample_seq(seq, &mut reduced.logits[range.clone()]),
                RowResult::Token(token) => self.sample_reduced(seq, Reduced::Token(*token)),
                RowResult::TopK(range) => self.sample_reduced(seq, Reduced::TopK(&reduced.candidates[range.clone()])),
            }
        }
        self.reduced = reduced;
        // Tokens of the step, and whether it mixed prompt chunks with decodes (one token each,
        // and a draft's).
        let (tokens, prompts, decodes) = schedule.seqs.iter().fold((0, false, false), |(t, p, d), s| {
            let decode = s.len == 1 + s.draft;
            (t + s.len, p || !decode, d || decode)
        });
        let mixed = prompts && decodes;
        let end = Instant::now();
        let ms = end.duration_since(started).as_secs_f64() * 1e3;
        self.step_cost.observe(tokens, mixed, ms);
        if self.spec.is_some() && !prompts {
            // The proposals' time is the controller's other term.
            self.spec_control.observe_step(tokens, end.duration_since(drafted).as_secs_f64() * 1e3);
        }
        self.phases.record(&StepMarks { start: started, drafted, forward_start, forward_end, end }, tokens);
        self.counters.steps_total += 1;
        self.last_progress = Instant::now();
        Ok(true)
    }

    /// Samples the next token of `seq` from its logits row (forking siblings first for `n > 1`).
    fn sample_seq(&mut self, seq: SeqId, row: &mut [f32]) {
        let Some(req_id) = self.seqs.get(&seq).map(|s| s.request.clone()) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&req_id) else {
            return;
        };
        if !req.forked {
            req.forked = true;
            let n = req.n;
            let mut pristine = row.to_vec();
            for index in 1..n {
                let child = self.next_seq;
                self.next_seq += 1;
                let parent = &self.seqs[&seq];
                let mut state = SeqState {
                    request: req_id.clone(),
                    index,
                    sampler: parent.sampler.fork(index as u64),
                    detok: parent.detok.clone(),
                    stop: parent.stop.clone(),
                    generated: 0,
                    last_token_at: None,
                    grammar: parent.grammar.as_ref().map(SeqGrammar::fork),
                    acceptance: Acceptance::default(),
                };
                pristine.copy_from_slice(row);
                let sampled = self.sample_with(&mut state, &req_id, &mut pristine);
                self.seqs.insert(child, state);
                self.scheduler.fork(seq, child, sampled.token);
                if let Some(r) = self.requests.get_mut(&req_id) {
                    r.live.push(child);
                }
                self.accept(child, sampled);
                if !self.requests.contains_key(&req_id) {
                    return; // failed (a structured-output matcher error)
                }
            }
        }
        let Some(mut state) = self.seqs.remove(&seq) else {
            return;
        };
        let sampled = self.sample_with(&mut state, &req_id, row);
        self.seqs.insert(seq, state);
        self.scheduler.append_token(seq, sampled.token);
        self.accept(seq, sampled);
    }

    fn sample_with(&mut self, state: &mut SeqState, req_id: &str, row: &mut [f32]) -> Sampled {
        let req = &self.requests[req_id];
        let suppress = self.suppressed(state, req_id);
        let (params, sampler) = (&req.sampling, &mut state.sampler);
        let (sampled, mask_time) = match state.grammar.as_ref().filter(|g| g.is_active()) {
            // A matcher error is reported when the token is fed to it (`accept`).
            Some(g) => g.with_mask(|mask| sampler.sample_masked(row, params, &suppress, mask.ok())),
            None => (sampler.sample(row, params, &suppress), None),
        };
        self.record_mask_time(mask_time);
        state.sampler.record(sampled.token);
        sampled
    }

    /// Handles a sampled token: text, stop checks, the delta, and finishing.
    fn accept(&mut self, seq: SeqId, sampled: Sampled) {
        let token = sampled.token;
        let Some(state) = self.seqs.get(&seq) else {
            return;
        };
        let Some(req) = self.requests.get(&state.request) else {
            return;
        };
        let generated = state.generated + 1;
        let past_min = generated > req.stop.min_tokens;
        let is_eos = !req.stop.ignore_eos && self.tokenizer.eos_token_ids().contains(&token);
        let stop_token = past_min && (is_eos || req.stop.stop_token_ids.contains(&token));
        let at_length = generated >= req.stop.max_tokens || req.prompt_len + generated >= self.limits.max_model_len;
        // An unconstrained sequence (the common case) skips the grammar's lookup.
        let grammar = if state.grammar.is_some() {
            self.advance_grammar(seq, token, stop_token || at_length)
        } else {
            Feed::Taken
        };
        let grammar_complete = match grammar {
            Feed::Taken => false,
            Feed::Complete => true,
            Feed::AlreadyComplete => return self.finish_complete_grammar(seq),
            Feed::Failed(message) => return self.fail_request_of(seq, &message),
        };
        let now = Instant::now();
        self.counters.generation_tokens_total += 1;
        self.generation_rate.add(now, 1);
        let Some(state) = self.seqs.get_mut(&seq) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&state.request) else {
            return;
        };
        state.generated = generated;
        req.completion_tokens += 1;
        let histograms = &mut self.counters.histograms;
        if let Some(previous) = state.last_token_at.replace(now) {
            histograms.inter_token_latency.observe_duration(now.saturating_duration_since(previous));
        }
        if req.first_token_at.is_none() {
            req.first_token_at = Some(now);
            histograms.time_to_first_token.observe_duration(now.saturating_duration_since(req.arrival));
            self.counters.prompt_tokens_total += req.prompt_len as u64;
        }
        if self.defer_output && !stop_token && !at_length && !grammar_complete && state.stop.is_empty() {
            // The sequence runs on whatever its text: the text and the delta wait for the next
            // step's device time (a constrained one's token is with the mask workers already).
            let logprobs = req.sampling.logprobs.map(|_| (sampled.logprob, sampled.top_logprobs));
            self.deferred.push(seq, token, past_min, logprobs);
            return;
        }
        if self.spec.is_some() && self.deferred.holds(seq) {
            // An earlier token of this step (a draft's) waits: it goes first.
            self.deferred.flush_seq(seq, &mut self.seqs, &self.requests, &self.tokenizer);
        }
        self.accept_now(seq, sampled, stop_token, at_length, grammar_complete, past_min)
    }

    /// The rest of `accept` for a token whose text and delta go out now.
    fn accept_now(
        &mut self,
        seq: SeqId,
        sampled: Sampled,
        stop_token: bool,
        at_length: bool,
        grammar_complete: bool,
        past_min: bool,
    ) {
        let token = sampled.token;
        let Some(state) = self.seqs.get_mut(&seq) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&state.request) else {
            return;
        };
        let asked = req.sampling.logprobs.map(|_| (sampled.logprob, sampled.top_logprobs.as_slice()));
        let logprobs = token_logprobs(&self.tokenizer, token, asked);
        let mut finish = None;
        let mut stop_reason = None;
        let mut text = String::new();
        if stop_token {
            finish = Some(FinishReason::Stop);
            stop_reason = Some(StopReason::Token(token));
        } else {
            let outcome = state.push_text(&self.tokenizer, token, past_min);
            text = outcome.emit;
            if outcome.stopped {
                finish = Some(FinishReason::Stop);
                stop_reason = outcome.matched.and_then(|i| req.stop.stop.get(i).cloned()).map(StopReason::String);
            }
        }
        if finish.is_none() && grammar_complete {
            // Nothing can follow: the choice ends here, its held-back text released.
            finish = Some(FinishReason::Stop);
            text.push_str(&drain_text(state, &self.tokenizer));
        }
        if finish.is_none() && at_length {
            finish = Some(FinishReason::Length);
        }
        match finish {
            Some(reason) => self.finish_seq(seq, reason, stop_reason, text, Some((token, logprobs))),
            None => {
                let index = state.index;
                let _ = req.tx.send(EngineEvent::Delta(ChoiceDelta {
                    index,
                    text,
                    token_ids: vec![token],
                    logprobs,
                    finish_reason: None,
                    stop_reason: None,
                }));
            }
        }
    }

    /// A snapshot of load and counters.
    pub fn stats(&self) -> EngineStats {
        let now = Instant::now();
        let pool = self.scheduler.pool();
        let prefix = self.scheduler.prefix_cache_stats();
        EngineStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            kv_blocks_total: pool.num_blocks(),
            kv_blocks_used: pool.num_blocks() - pool.num_free(),
            prefix_cache_queries: prefix.queries,
            prefix_cache_hits: prefix.hits,
            prompt_tokens_per_s: self.prompt_rate.rate(now),
            generation_tokens_per_s: self.generation_rate.rate(now),
            stalled_for: if self.has_work() { now.duration_since(self.last_progress) } else { Duration::ZERO },
            ..self.counters.clone()
        }
    }

    /// Marks the start of a busy period (so a long idle gap is not reported as a stall).
    pub fn mark_progress(&mut self) {
        self.last_progress = Instant::now();
        self.phases.idle();
    }
}

impl std::fmt::Debug for EngineCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCore")
            .field("model", &self.model.describe())
            .field("requests", &self.requests.len())
            .finish()
    }
}
