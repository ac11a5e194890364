//! The draft-model proposer (vLLM's `draft_model`): a smaller Llama that shares the target's
//! tokenizer runs beside it, with a paged KV cache of its own, and proposes for each drafting
//! sequence its greedy continuation: one forward over what its cache lacks of the sequence (the
//! tokens accepted since its last proposal, or the whole sequence the first time), then one
//! single-token forward per further draft token, every drafting sequence batched together.
//!
//! Why greedy: the draft's token is a function of the sequence's tokens, a point-mass proposal,
//! so the verification in `engine/core_spec.rs` (sample the target, accept while the sample
//! equals the draft) is exact rejection sampling for any sampling parameters (see `spec`), as
//! with prompt lookup. vLLM's V1 engine drafts the same way. Sampling the draft and accepting
//! with min(1, p/q) would accept more at high temperatures; it needs q's rows from the proposer
//! and a residual draw, and is left for later.
//!
//! What it owns: the draft [`Model`] (CPU or GPU, whatever the target runs on), the pool of its
//! cache blocks, and per sequence what that cache holds.
//!
//! Invariants:
//! - a sequence's draft cache holds the K/V of positions `0..verified + fed.len()`: the
//!   sequence's tokens `0..verified` (they never change: a sequence only grows, and its draft is
//!   gone by the time it is proposed for again), then `fed`, the draft tokens fed after them,
//!   which stay valid exactly as far as the target accepted them (`valid_prefix`);
//! - the state of a sequence that is no longer running (finished, aborted, preempted) is dropped
//!   with its blocks at the next proposal ([`DraftModel::retain_running`]), so nothing leaks;
//! - a proposal computes at most `max_batched_tokens` catch-up tokens in all: a sequence whose
//!   catch-up does not fit gets a chunk of it and no draft this step (a long prompt catches up
//!   over several steps, never in one unbounded forward);
//! - a sequence the pool cannot hold takes the blocks of sequences not asked for this step (their
//!   states dropped: they catch up again when next asked), then gets a shorter draft or none,
//!   never the blocks of another sequence asked this step. The draft's cache has as many blocks
//!   as the target's but shares no prefix (prefix caching, `n > 1` forks), so with shared
//!   prompts it holds fewer sequences than the target's;
//! - a proposal commits nothing to a state that a failed forward would leave wrong: the engine
//!   drops the draft model (and every state) when one fails.

use std::collections::HashMap;

use crate::kv_cache::{BlockId, BlockPool};
use crate::model::{ForwardBatch, Model};
use crate::sampling::reduce::{ReducedRows, Reduction, RowPlan, RowResult};
use crate::sampling::row::argmax;
use crate::scheduler::SeqId;
use crate::{Result, TokenId};

/// One sequence to draft for: its tokens (prompt and output, no draft) and the most tokens to
/// propose.
#[derive(Clone, Copy, Debug)]
pub struct DraftAsk<'a> {
    pub id: SeqId,
    pub tokens: &'a [TokenId],
    pub max: usize,
}

/// What the draft cache holds of one sequence.
#[derive(Debug, Default)]
struct DraftSeq {
    blocks: Vec<BlockId>,
    /// The sequence's first `verified` tokens are in the cache.
    verified: usize,
    /// Draft tokens fed after them (positions `verified..`), as proposed last time.
    fed: Vec<TokenId>,
}

impl DraftSeq {
    /// Positions of the cache that hold `tokens`' own tokens (always leaving the last one to be
    /// fed, so the forward has a row to propose from).
    fn valid_prefix(&self, tokens: &[TokenId]) -> usize {
        if tokens.len() < self.verified {
            return 0; // not the sequence this state was made for: start over
        }
        let after = &tokens[self.verified..];
        let same = self.fed.iter().zip(after).take_while(|(a, b)| a == b).count();
        (self.verified + same).min(tokens.len().saturating_sub(1))
    }
}

/// One drafting sequence's progress through a proposal.
#[derive(Clone, Copy, Debug)]
struct Work {
    /// Index into the proposal's asks (and outputs).
    ask: usize,
    /// Tokens to propose (0: catching up only).
    want: usize,
    /// Position of the next token fed.
    pos: usize,
}

/// The draft model and its cache (see the module's documentation).
pub struct DraftModel {
    model: Box<dyn Model>,
    pool: BlockPool,
    seqs: HashMap<SeqId, DraftSeq>,
    block_size: usize,
    max_batched_tokens: usize,
    /// Reused per proposal.
    batch: ForwardBatch,
    plans: Vec<RowPlan>,
    rows: ReducedRows,
    work: Vec<Work>,
    running: Vec<SeqId>,
    asked: Vec<SeqId>,
    /// The last proposal's single-token rounds (after the first forward): time and tokens.
    rounds_ms: f64,
    rounds_tokens: usize,
}

impl DraftModel {
    /// A proposer around `model`, computing at most `max_batched_tokens` catch-up tokens per
    /// proposal.
    pub fn new(model: Box<dyn Model>, max_batched_tokens: usize) -> DraftModel {
        DraftModel {
            pool: BlockPool::new(model.num_blocks()),
            block_size: model.block_size(),
            model,
            seqs: HashMap::new(),
            max_batched_tokens: max_batched_tokens.max(1),
            batch: ForwardBatch::default(),
            plans: Vec::new(),
            rows: ReducedRows::default(),
            work: Vec::new(),
            running: Vec::new(),
            asked: Vec::new(),
            rounds_ms: 0.0,
            rounds_tokens: 0,
        }
    }

    /// The last proposal's single-token rounds: milliseconds and tokens proposed in them (what
    /// one more draft token costs; the first forward also catches the cache up, whose cost is
    /// keeping a draft at all, not proposing more).
    pub fn last_rounds(&self) -> (f64, usize) {
        (self.rounds_ms, self.rounds_tokens)
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// Blocks of the draft cache held by sequences.
    pub fn blocks_used(&self) -> usize {
        self.pool.num_blocks() - self.pool.num_free()
    }

    /// Sequences whose tokens the draft cache holds.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Drops the state (and gives back the blocks) of every sequence not in `running`.
    pub fn retain_running(&mut self, running: &[SeqId]) {
        self.running.clear();
        self.running.extend_from_slice(running);
        self.running.sort_unstable();
        let (ids, pool) = (&self.running, &mut self.pool);
        self.seqs.retain(|id, s| {
            let keep = ids.binary_search(id).is_ok();
            if !keep {
                pool.release(s.blocks.drain(..).rev());
            }
            keep
        });
    }

    /// Proposes for each of `asks` (distinct sequences, all among `running`) up to its `max`
    /// tokens into `out[i]` (cleared first; empty when it gets no draft this step).
    pub fn propose(&mut self, running: &[SeqId], asks: &[DraftAsk<'_>], out: &mut Vec<Vec<TokenId>>) -> Result<()> {
        self.retain_running(running);
        out.resize_with(asks.len(), Vec::new);
        out.iter_mut().for_each(Vec::clear);
        self.work.clear();
        self.batch.clear();
        (self.rounds_ms, self.rounds_tokens) = (0.0, 0);
        self.asked.clear();
        self.asked.extend(asks.iter().map(|a| a.id));
        self.asked.sort_unstable();
        let mut budget = self.max_batched_tokens;
        for (i, ask) in asks.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if let Some(work) = self.catch_up(i, ask, &mut budget) {
                self.work.push(work);
            }
        }
        // Round 0 feeds what each cache lacks; round r >= 1 feeds draft token r.
        let mut round = 0;
        while !self.batch.seqs.is_empty() {
            let started = std::time::Instant::now();
            self.run_batch(out, round)?;
            if round > 0 {
                self.rounds_ms += started.elapsed().as_secs_f64() * 1e3;
                self.rounds_tokens += self.batch.seqs.len();
            }
            round += 1;
            self.batch.clear();
            let bs = self.block_size;
            for w in self.work.iter_mut().filter(|w| w.want > round) {
                let (ask, last) = (&asks[w.ask], *out[w.ask].last().expect("a drafting row proposed"));
                let state = self.seqs.get_mut(&ask.id).expect("a drafting sequence has a state");
                self.batch.push_seq(&[last], w.pos, &state.blocks, bs, true);
                state.fed.push(last);
                w.pos += 1;
            }
            self.work.retain(|w| w.want > round);
        }
        Ok(())
    }

    /// Plans sequence `ask`'s first forward of this proposal: the tokens its cache lacks (all
    /// of them when the budget allows and blocks for the draft can be had, with a logits row;
    /// else a chunk without one). Returns its work when it drafts.
    fn catch_up(&mut self, index: usize, ask: &DraftAsk<'_>, budget: &mut usize) -> Option<Work> {
        let bs = self.block_size;
        let state = self.seqs.entry(ask.id).or_default();
        let valid = state.valid_prefix(ask.tokens);
        let missing = ask.tokens.len() - valid;
        if missing == 0 {
            return None; // an empty sequence: nothing to propose from
        }
        state.verified = valid;
        state.fed.clear();
        let (chunk, mut want) = if missing <= *budget { (missing, ask.max) } else { (*budget, 0) };
        // The cache needs the chunk's positions, then one per draft token after the first (the
        // last one proposed is never fed); a draft is cut to the positions the pool can give,
        // after taking the blocks of sequences not asked for this step (the draft's cache shares
        // no prefix, so it can run short where the target's does not).
        let wanted = (valid + chunk + want.saturating_sub(1)).div_ceil(bs);
        let held = state.blocks.len();
        if wanted > held + self.pool.num_free() {
            self.evict_unasked(wanted - held);
        }
        let state = self.seqs.get_mut(&ask.id).expect("the asking sequence's state is kept");
        let capacity = (state.blocks.len() + self.pool.num_free()) * bs;
        let room = capacity.checked_sub(valid + chunk)?;
        want = want.min(room + 1);
        let needed = valid + chunk + want.saturating_sub(1);
        let blocks = needed.div_ceil(bs);
        if blocks > state.blocks.len() {
            let more = self.pool.allocate(blocks - state.blocks.len()).expect("counted free blocks");
            state.blocks.extend(more);
        }
        let tokens = &ask.tokens[valid..valid + chunk];
        self.batch.push_seq(tokens, valid, &state.blocks, bs, want > 0);
        *budget -= chunk;
        if want == 0 {
            state.verified = valid + chunk;
            return None;
        }
        state.verified = ask.tokens.len();
        Some(Work { ask: index, want, pos: ask.tokens.len() })
    }

    /// Drops the states of sequences not asked for this step until `blocks` blocks are free (or
    /// none is left to drop).
    fn evict_unasked(&mut self, blocks: usize) {
        let (asked, pool) = (&self.asked, &mut self.pool);
        self.seqs.retain(|id, s| {
            if pool.num_free() >= blocks || asked.binary_search(id).is_ok() || s.blocks.is_empty() {
                return true;
            }
            pool.release(s.blocks.drain(..).rev());
            false
        });
    }

    /// Runs the planned batch (every logits row reduced to its argmax) and appends each drafting
    /// sequence's proposed token; a sequence whose row has no finite value stops drafting.
    fn run_batch(&mut self, out: &mut [Vec<TokenId>], round: usize) -> Result<()> {
        let greedy = RowPlan { reduction: Reduction::Argmax, edits: Vec::new(), mask: None };
        self.plans.clear();
        self.plans.resize(self.batch.logits_rows.len(), greedy);
        self.model.forward_reduced(&self.batch, &self.plans, &mut self.rows)?;
        // Logits rows come in batch order, which is the order of `work` (catch-up chunks without
        // a row are not in it).
        for (w, row) in self.work.iter_mut().zip(&self.rows.rows) {
            let token = match row {
                RowResult::Token(t) => *t,
                RowResult::Full(range) => argmax(&self.rows.logits[range.clone()]).map(|t| t as TokenId),
                RowResult::TopK(range) => self.rows.candidates[range.clone()].first().map(|c| c.0),
            };
            match token {
                Some(t) => out[w.ask].push(t),
                None => w.want = round, // nothing to propose from here on
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "draft_model_tests.rs"]
mod tests;
