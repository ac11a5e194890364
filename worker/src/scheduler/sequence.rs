//! A sequence as the scheduler sees it: its tokens, how many of them are in the KV cache, and
//! the blocks that hold them.

use std::sync::Arc;

use crate::TokenId;
use crate::kv_cache::{BlockHash, BlockId};

/// A sequence's id, unique within one engine.
pub type SeqId = u64;

/// The scheduler's view of one sequence.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// Scheduling order, lower first: the request's priority class (vLLM's `priority`, 0 unless
    /// the priority policy is on), then admission order. Lower runs first and is preempted last.
    pub priority: (i64, u64),
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Trailing tokens of `tokens` that are proposed, not verified (speculative decoding,
    /// `Scheduler::set_draft`); 0 otherwise. They are computed with the sequence's next token
    /// and never hashed into the prefix cache.
    pub draft: usize,
    /// Cache blocks holding positions `i * block_size ..`, in order.
    pub blocks: Vec<BlockId>,
    /// Hashes of the leading full, computed blocks (registered in the prefix cache).
    pub block_hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache when the sequence was first admitted.
    pub cached_prompt_tokens: usize,
    /// True once the sequence has been admitted at least once.
    pub admitted: bool,
    /// The sequence wants the logits row of every prompt position (prompt log-probabilities):
    /// rows `0..prompt_len - 1`, each predicting the next prompt token.
    pub prompt_logprobs: bool,
    /// Prompt rows already produced (`0..prompt_rows_done`); kept across preemption, so a
    /// recompute never produces a row twice.
    pub prompt_rows_done: usize,
    /// A pooling (embedding) sequence: it computes its prompt and never samples.
    pub pooling: bool,
    /// Prompt positions whose final hidden state is still wanted (pooling); its start advances
    /// as steps produce them and is kept across preemption, so a recompute never produces a row
    /// twice. Empty for generating sequences.
    pub hidden_pending: std::ops::Range<usize>,
    /// The parent hash of its first block: `BlockHash::of_salt` of the request's `cache_salt`,
    /// so only sequences with the same salt share cached blocks; `None` without a salt.
    pub salt: Option<BlockHash>,
    /// The request's tenant under the head's fair policy (`None`: no named key, or none sent)
    /// and its weight (0 counts as 1): the scheduler shares slots across tenants by weight.
    pub tenant: Option<Arc<str>>,
    pub tenant_weight: u32,
    /// The scheduler's small number for `tenant` (0: none), set when it is added.
    pub(super) tenant_slot: usize,
}

impl Sequence {
    /// A sequence of priority class 0 admitted `order`-th.
    pub fn new(id: SeqId, order: u64, prompt: Vec<TokenId>) -> Sequence {
        let prompt_len = prompt.len();
        Sequence {
            id,
            priority: (0, order),
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            draft: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            cached_prompt_tokens: 0,
            admitted: false,
            prompt_logprobs: false,
            prompt_rows_done: 0,
            pooling: false,
            hidden_pending: 0..0,
            salt: None,
            tenant: None,
            tenant_weight: 1,
            tenant_slot: 0,
        }
    }

    /// Prompt rows still to produce: `prompt_rows_done..prompt_len - 1` when it wants them.
    pub fn pending_prompt_rows(&self) -> std::ops::Range<usize> {
        match self.prompt_logprobs {
            true => self.prompt_rows_done..self.prompt_len.saturating_sub(1).max(self.prompt_rows_done),
            false => 0..0,
        }
    }

    /// Tokens not yet in the cache (the whole prompt before prefill, 1 while decoding, plus
    /// the draft's tokens).
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Decoding: only the last sampled token (and a draft after it) is left to compute.
    pub fn is_decoding(&self) -> bool {
        self.num_uncomputed() == 1 + self.draft
    }

    /// Its tenant's weight, at least 1.
    pub fn weight(&self) -> u64 {
        u64::from(self.tenant_weight.max(1))
    }

    /// Generated tokens so far.
    pub fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}
