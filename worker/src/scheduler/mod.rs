//! Continuous batching: which sequences run in each step and how many tokens each computes.
//!
//! Every step the scheduler fills a token budget (`max_num_batched_tokens`): first the running
//! sequences, oldest first (one token each while decoding, the rest of a chunked prompt
//! otherwise), then waiting sequences in arrival order while the budget, `max_num_seqs` and free
//! blocks allow (with the priority policy, vLLM's `--scheduling-policy priority`, "oldest first"
//! and "arrival order" become "lowest priority value, then oldest", and a waiting sequence of a
//! better class that cannot be admitted preempts running ones of a worse class, newest first); a prompt longer than what is left of the budget is split across steps (chunked
//! prefill). The engine may also cap the prompt tokens of a step that carries decodes
//! ([`Scheduler::schedule_limited`], sized from measured step costs), so long prompts do not
//! stall every decoding stream for a whole budget's worth of prefill. A new sequence first
//! takes the longest run of its full blocks found in the prefix cache and computes only the
//! rest (only blocks cached under the same `cache_salt`: a salt seeds the hash chain). When a
//! running sequence needs a block and none is free, the
//! newest running sequence is preempted: its blocks are released (cached ones stay findable) and
//! it goes back to the front of the waiting queue to be recomputed, keeping its generated tokens.
//!
//! A sequence that wants prompt log-probabilities gets the logits row of each prompt position as
//! its prefill computes it ([`Schedule::prompt_rows`], at most [`MAX_PROMPT_ROWS_PER_STEP`] a
//! step, which may shorten its chunk); until it has them all it reads nothing from the prefix
//! cache (as vLLM's `skip_reading_prefix_cache`), and a recompute after preemption produces no
//! row twice.
//!
//! A pooling sequence (an embedding request) is prefill only: it never samples, and each step
//! that computes a prompt position it pools gets that row's final hidden state
//! ([`Schedule::hidden_rows`]). It reads from the prefix cache only blocks that end before its
//! first wanted position (mean pooling reads none; last-token pooling all but the last token,
//! as any prompt), and like prompt rows, no hidden row is produced twice.

mod draft;
mod fairness;
mod sequence;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

pub use sequence::{SeqId, Sequence};

use crate::kv_cache::{BlockHash, BlockPool, PrefixCacheStats};
use crate::model::ForwardBatch;

/// The most prompt-logprob rows one step produces (each is a full row of logits on the host).
pub const MAX_PROMPT_ROWS_PER_STEP: usize = 512;

/// Limits that shape each step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    pub policy: SchedulingPolicy,
}

/// The order in which sequences are admitted and preempted (vLLM's `--scheduling-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    // (Plain comments: documented variants would make clap print every flag's help in the long
    // layout.) First come, first served; every request's `priority` must be 0.
    #[default]
    Fcfs,
    // By each request's `priority` (lower first), then arrival.
    Priority,
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens computed this step, starting at position `start`.
    pub start: usize,
    pub len: usize,
    /// The step reaches the end of the sequence's tokens, so a new token is sampled from it.
    pub samples: bool,
    /// Draft tokens at the end of this share (speculative decoding): the batch has a logits row
    /// for each and for the token before them.
    pub draft: usize,
}

/// What one step runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted while building this step (now waiting, to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Prompt positions whose logits rows this step produces for prompt log-probabilities, per
    /// sequence; the batch asks for them after every sampling row, in this order.
    pub prompt_rows: Vec<(SeqId, Range<usize>)>,
    /// Prompt positions whose final hidden states this step produces for pooling sequences, in
    /// the order the batch's `hidden_rows` lists them.
    pub hidden_rows: Vec<(SeqId, Range<usize>)>,
}

impl Schedule {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

/// Waiting and running sequences, and the block pool they share.
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// Running sequences ordered by priority (lowest class, then oldest, first); `waiting` is
    /// in the same order.
    running: Vec<SeqId>,
    num_preemptions: u64,
    /// Sequences in `seqs` that carry a tenant: while any do, admission and preemption share
    /// slots across tenants ([`fairness`]).
    tenanted: usize,
    /// Tenants' small numbers (`Sequence::tenant_slot`, from 1), while tenanted sequences are in.
    tenant_slots: HashMap<std::sync::Arc<str>, usize>,
    /// Per tenant slot, the admission count when it last had a sequence admitted ([`fairness`]).
    admitted_at: Vec<u64>,
    admissions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            pool: BlockPool::new(cfg.num_blocks),
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
            tenanted: 0,
            tenant_slots: HashMap::new(),
            admitted_at: Vec::new(),
            admissions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Tokens the whole cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.cfg.num_blocks * self.cfg.block_size
    }

    /// Queues a new sequence.
    pub fn add(&mut self, mut seq: Sequence) {
        seq.tenant_slot = self.tenant_slot(seq.tenant.as_ref());
        let at = self.waiting.partition_point(|w| self.seqs[w].priority <= seq.priority);
        self.waiting.insert(at, seq.id);
        self.tenanted += usize::from(seq.tenant.is_some());
        self.seqs.insert(seq.id, seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.pool.stats
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Decides the next step.
    pub fn schedule(&mut self) -> Schedule {
        self.schedule_limited(|_| None)
    }

    /// Decides the next step, giving prompt chunks (and recomputes) at most
    /// `prompt_limit(decodes)` tokens when the step carries `decodes` decode tokens (`None`: no
    /// limit beyond the budget). Decode tokens are never limited.
    pub fn schedule_limited(&mut self, prompt_limit: impl Fn(usize) -> Option<usize>) -> Schedule {
        let decodes = self.running.iter().filter(|id| self.seqs[id].is_decoding()).count();
        let mut prompt_left = prompt_limit(decodes).unwrap_or(usize::MAX);
        let mut out = Schedule::default();
        let made_room = self.preempt_to_admit(&mut out.preempted);
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut rows_left = MAX_PROMPT_ROWS_PER_STEP;
        let mut i = 0;
        // Decoding sequences not yet scheduled: a draft never takes their token's budget.
        let mut decodes_left = decodes;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            if self.seqs[&id].draft > 0 {
                self.fit_draft(id, budget.saturating_sub(decodes_left.saturating_sub(1)));
            }
            let (want, decoding) = (self.seqs[&id].num_uncomputed(), self.seqs[&id].is_decoding());
            decodes_left -= usize::from(decoding && decodes_left > 0);
            let n = if decoding { want.min(budget) } else { want.min(budget).min(prompt_left) };
            let rows_before = out.prompt_rows.len();
            let n = self.take_prompt_rows(id, n, &mut rows_left, &mut out.prompt_rows);
            if n == 0 {
                i += 1;
                continue;
            }
            if !self.reserve_running(id, n, &mut out.preempted) {
                // `id` itself was preempted: it runs nothing, so it gives back the prompt rows
                // it took; the sequence after it (if any) is now at `i`.
                for (_, rows) in out.prompt_rows.drain(rows_before..) {
                    rows_left += rows.len();
                }
                continue;
            }
            out.seqs.push(self.scheduled(id, n, &mut out.hidden_rows));
            budget -= n;
            if !decoding {
                prompt_left -= n;
            }
            i += 1;
        }
        if out.preempted.len() == made_room {
            budget = budget.min(prompt_left);
            self.admit_waiting(&mut budget, &mut rows_left, &mut out);
        }
        out
    }

    /// `id`'s share of the step, `n` tokens from its first uncomputed one; a pooling sequence
    /// records the positions it pools among them.
    fn scheduled(&self, id: SeqId, n: usize, hidden_rows: &mut Vec<(SeqId, Range<usize>)>) -> ScheduledSeq {
        let s = &self.seqs[&id];
        let (start, end) = (s.num_computed, s.num_computed + n);
        let wanted = s.hidden_pending.start.max(start)..s.hidden_pending.end.min(end);
        if !wanted.is_empty() {
            hidden_rows.push((id, wanted));
        }
        let samples = !s.pooling && end == s.tokens.len();
        ScheduledSeq { id, start, len: n, samples, draft: if samples { s.draft } else { 0 } }
    }

    /// Shortens a chunk of `n` tokens of `id` so its prompt rows fit in `rows_left`, and records
    /// them. Returns the tokens to compute.
    fn take_prompt_rows(
        &self,
        id: SeqId,
        n: usize,
        rows_left: &mut usize,
        rows: &mut Vec<(SeqId, Range<usize>)>,
    ) -> usize {
        let s = &self.seqs[&id];
        let (start, pending) = (s.num_computed, s.pending_prompt_rows());
        if pending.is_empty() || start + n <= pending.start {
            return n;
        }
        // Positions before `pending.start` had their rows in an earlier pass (a recompute).
        let from = pending.start.max(start);
        let end = (start + n).min(pending.end).min(from + *rows_left);
        if end > from {
            rows.push((id, from..end));
            *rows_left -= end - from;
        }
        if end < (start + n).min(pending.end) { end - start } else { n }
    }

    /// Makes room for `n` more tokens of running sequence `id`, preempting the newest running
    /// sequences (among tenants: of the tenant furthest over its share) as needed. False if `id` itself had to be preempted.
    fn reserve_running(&mut self, id: SeqId, n: usize, preempted: &mut Vec<SeqId>) -> bool {
        loop {
            let s = &self.seqs[&id];
            let need = self.blocks_for(s.num_computed + n).saturating_sub(s.blocks.len());
            if let Some(new) = self.pool.allocate(need) {
                self.seqs.get_mut(&id).expect("running sequence").blocks.extend(new);
                return true;
            }
            let victim = self.block_victim(id);
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        let s = self.seqs.get_mut(&id).expect("preempted sequence exists");
        self.pool.release(s.blocks.drain(..).rev());
        s.block_hashes.clear();
        s.num_computed = 0;
        let verified = s.tokens.len() - s.draft;
        s.tokens.truncate(verified);
        s.draft = 0;
        // Ahead of every waiting sequence of its order (under FCFS: the front).
        let key = s.priority;
        let at = self.waiting.partition_point(|w| self.seqs[w].priority < key);
        self.waiting.insert(at, id);
        self.num_preemptions += 1;
    }

    /// Preempts running sequences so the next waiting one can be admitted: with the priority
    /// policy, while the first waiting sequence cannot be admitted (no sequence slot, or fewer
    /// free blocks than its first chunk needs) and the last running one is of a worse class,
    /// that one; then, among tenants ([`fairness`]), the newest sequence of a tenant over its
    /// share while the next sequence to admit cannot be. Returns how many it preempted.
    fn preempt_to_admit(&mut self, preempted: &mut Vec<SeqId>) -> usize {
        let mut count = 0;
        while self.cfg.policy == SchedulingPolicy::Priority {
            let (Some(&w), Some(&r)) = (self.waiting.front(), self.running.last()) else {
                break;
            };
            if self.seqs[&w].priority.0 >= self.seqs[&r].priority.0 || self.admissible(w) {
                break;
            }
            self.preempt(r);
            preempted.push(r);
            count += 1;
        }
        while self.tenanted() {
            let shares = self.shares();
            let Some(at) = self.next_waiting(Some(&shares)) else {
                break;
            };
            let id = self.waiting[at];
            if self.admissible(id) {
                break;
            }
            let Some(victim) = self.fairness_victim(id, &shares) else {
                break;
            };
            self.preempt(victim);
            preempted.push(victim);
            count += 1;
        }
        count
    }

    /// Waiting sequence `id` has a sequence slot and the blocks its first chunk needs.
    fn admissible(&self, id: SeqId) -> bool {
        let waiting = &self.seqs[&id];
        let chunk = waiting.num_uncomputed().min(self.cfg.max_num_batched_tokens);
        let need = self.blocks_for(waiting.num_computed + chunk).saturating_sub(waiting.blocks.len());
        self.running.len() < self.cfg.max_num_seqs && self.pool.num_free() >= need
    }

    fn admit_waiting(&mut self, budget: &mut usize, rows_left: &mut usize, out: &mut Schedule) {
        let mut shares = self.tenanted().then(|| self.shares());
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(at) = self.next_waiting(shares.as_ref()) else {
                break;
            };
            let id = self.waiting[at];
            let hits = self.take_cached_prefix(id);
            let n = self.seqs[&id].num_uncomputed().min(*budget);
            let rows_before = out.prompt_rows.len();
            let n = self.take_prompt_rows(id, n, rows_left, &mut out.prompt_rows);
            if n == 0 {
                break; // no prompt rows left this step (it took nothing from the cache)
            }
            let s = &self.seqs[&id];
            let need = self.blocks_for(s.num_computed + n).saturating_sub(s.blocks.len());
            let Some(new) = self.pool.allocate(need) else {
                // Not enough room: give the cache hits back and wait for blocks to free up.
                if let Some(taken) = out.prompt_rows.drain(rows_before..).next() {
                    *rows_left += taken.1.len();
                }
                let s = self.seqs.get_mut(&id).expect("waiting sequence");
                self.pool.release(s.blocks.drain(..).rev());
                s.block_hashes.clear();
                s.num_computed = 0;
                break;
            };
            self.waiting.remove(at);
            if let Some(shares) = &mut shares {
                shares.add(&self.seqs[&id]);
                self.note_admitted(id);
            }
            let s = self.seqs.get_mut(&id).expect("waiting sequence");
            s.blocks.extend(new);
            if !s.admitted {
                s.admitted = true;
                s.cached_prompt_tokens = hits.min(s.prompt_len);
            }
            let priority = s.priority;
            out.seqs.push(self.scheduled(id, n, &mut out.hidden_rows));
            *budget -= n;
            let at = self.running.partition_point(|r| self.seqs[r].priority <= priority);
            self.running.insert(at, id);
        }
    }

    /// Points a sequence with nothing computed at the longest cached run of its full blocks
    /// (never all of its tokens: the last one is always computed, to produce logits). Returns
    /// the number of tokens found.
    fn take_cached_prefix(&mut self, id: SeqId) -> usize {
        let bs = self.cfg.block_size;
        let s = self.seqs.get_mut(&id).expect("waiting sequence");
        let wants_rows = !s.pending_prompt_rows().is_empty();
        if !self.cfg.enable_prefix_caching || s.num_computed > 0 || !s.blocks.is_empty() || wants_rows {
            return 0;
        }
        let mut max_blocks = (s.tokens.len() - 1) / bs;
        if s.pooling {
            // Only blocks that end before the first position it pools (their rows are needed).
            max_blocks = max_blocks.min(s.hidden_pending.start / bs);
        }
        let mut parent: Option<BlockHash> = s.salt;
        for b in 0..max_blocks {
            let hash = BlockHash::of(parent, &s.tokens[b * bs..(b + 1) * bs]);
            match self.pool.lookup(hash) {
                Some(block) => {
                    s.blocks.push(block);
                    s.block_hashes.push(hash);
                    parent = Some(hash);
                }
                None => break,
            }
        }
        s.num_computed = s.blocks.len() * bs;
        if !s.admitted {
            self.pool.stats.queries += s.tokens.len() as u64;
            self.pool.stats.hits += s.num_computed as u64;
        }
        s.num_computed
    }

    /// The packed model input for a schedule.
    pub fn build_batch(&self, schedule: &Schedule) -> ForwardBatch {
        let mut batch = ForwardBatch::default();
        let mut first_row = HashMap::with_capacity(schedule.prompt_rows.len() + schedule.hidden_rows.len());
        for item in &schedule.seqs {
            let s = &self.seqs[&item.id];
            first_row.insert(item.id, (batch.num_tokens(), item.start));
            batch.push_seq(
                &s.tokens[item.start..item.start + item.len],
                item.start,
                &s.blocks,
                self.cfg.block_size,
                item.samples,
            );
            if item.draft > 0 {
                // The rows before the last, one per draft token: the sequence's rows stay
                // together, in position order.
                let last = batch.logits_rows.pop().expect("a sampling sequence's row");
                batch.logits_rows.extend(last - item.draft..=last);
            }
        }
        for (id, positions) in &schedule.prompt_rows {
            let (row, start) = first_row[id];
            batch.logits_rows.extend(positions.clone().map(|p| row + p - start));
        }
        for (id, positions) in &schedule.hidden_rows {
            let (row, start) = first_row[id];
            batch.hidden_rows.extend(positions.clone().map(|p| row + p - start));
        }
        batch
    }

    /// Records that the step ran: advances each sequence and makes newly full blocks findable.
    pub fn complete(&mut self, schedule: &Schedule) {
        let bs = self.cfg.block_size;
        for item in &schedule.seqs {
            let Some(s) = self.seqs.get_mut(&item.id) else {
                continue;
            };
            s.num_computed = item.start + item.len;
            if let Some((_, rows)) = schedule.prompt_rows.iter().find(|(id, _)| *id == item.id) {
                s.prompt_rows_done = s.prompt_rows_done.max(rows.end);
            }
            if let Some((_, rows)) = schedule.hidden_rows.iter().find(|(id, _)| *id == item.id) {
                s.hidden_pending.start = s.hidden_pending.start.max(rows.end);
            }
            if !self.cfg.enable_prefix_caching {
                continue;
            }
            // A draft's positions are computed but not verified: not findable until they are.
            while s.block_hashes.len() < (s.num_computed - s.draft) / bs {
                let b = s.block_hashes.len();
                let parent = b.checked_sub(1).map(|p| s.block_hashes[p]).or(s.salt);
                let hash = BlockHash::of(parent, &s.tokens[b * bs..(b + 1) * bs]);
                self.pool.register(s.blocks[b], hash);
                s.block_hashes.push(hash);
            }
        }
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: crate::TokenId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Starts a sibling of `parent` (for `n > 1`): the same prompt followed by `first_token`,
    /// sharing the parent's full prompt blocks; the partial last block is recomputed by the child.
    pub fn fork(&mut self, parent: SeqId, child: SeqId, first_token: crate::TokenId) {
        let bs = self.cfg.block_size;
        let p = &self.seqs[&parent];
        let shared = (p.prompt_len / bs).min(p.blocks.len());
        let mut seq = Sequence::new(child, 0, p.tokens[..p.prompt_len].to_vec());
        seq.priority = p.priority;
        seq.tokens.push(first_token);
        seq.blocks = p.blocks[..shared].to_vec();
        seq.block_hashes = p.block_hashes[..shared.min(p.block_hashes.len())].to_vec();
        seq.salt = p.salt;
        seq.tenant = p.tenant.clone();
        seq.tenant_weight = p.tenant_weight;
        seq.tenant_slot = p.tenant_slot;
        self.tenanted += usize::from(seq.tenant.is_some());
        seq.num_computed = shared * bs;
        seq.cached_prompt_tokens = p.cached_prompt_tokens;
        seq.admitted = true;
        for &b in &seq.blocks {
            self.pool.share(b);
        }
        let at = self.running.iter().position(|&r| r == parent).map_or(self.running.len(), |i| i + 1);
        self.running.insert(at, child);
        self.seqs.insert(child, seq);
    }

    /// Removes a sequence (finished or aborted) and releases its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut s = self.seqs.remove(&id)?;
        self.tenanted -= usize::from(s.tenant.is_some());
        if self.tenanted == 0 {
            self.forget_tenants();
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.pool.release(s.blocks.drain(..).rev());
        Some(s)
    }
}

#[cfg(test)]
mod tests;
