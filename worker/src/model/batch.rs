//! The packed input of one engine step, independent of the device that runs it.
//!
//! Tokens of all scheduled sequences are concatenated: sequence `s` owns rows
//! `query_start..query_start + query_len`. Each token carries its absolute position and the cache
//! slot its K/V goes to (`block * block_size + offset`). Logits are produced only for the rows in
//! `logits_rows` (the last token of each sequence that samples this step, then the prompt rows of
//! sequences that want prompt log-probabilities), in that order. The final-norm hidden states
//! of the rows in `hidden_rows` (the prompt positions a pooling sequence reads) come back too,
//! in that order, through [`crate::model::Model::hidden_states`].

use crate::kernels::cpu::attention::QueryRef;
use crate::{Result, TokenId, WorkerError};

/// One sequence's part of a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchSeq {
    /// First row of this sequence in the packed token arrays.
    pub query_start: usize,
    /// Tokens this sequence computes this step (1 for decode, a chunk for prefill).
    pub query_len: usize,
    /// Tokens of this sequence in the cache after this step (positions `0..context_len`).
    pub context_len: usize,
    /// Physical cache blocks, in position order, covering `context_len` tokens.
    pub block_table: Vec<u32>,
}

/// One attention query per computed token of `seqs`, in row order: token `i` of a sequence's
/// chunk sees the first `context_len - query_len + i + 1` cached positions (causal).
pub fn attention_queries(seqs: &[BatchSeq]) -> Vec<QueryRef<'_>> {
    seqs.iter()
        .flat_map(|s| {
            (0..s.query_len).map(move |i| QueryRef {
                block_table: &s.block_table,
                context_len: s.context_len - s.query_len + i + 1,
            })
        })
        .collect()
}

/// Everything a forward pass needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardBatch {
    pub token_ids: Vec<TokenId>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<BatchSeq>,
    /// Rows whose logits are wanted, in output order.
    pub logits_rows: Vec<usize>,
    /// Rows whose final-norm hidden state is wanted (pooling), in output order.
    pub hidden_rows: Vec<usize>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.seqs.clear();
        self.logits_rows.clear();
        self.hidden_rows.clear();
    }

    /// Rejects a batch that would index outside the vocabulary, the rotary tables (positions
    /// below `max_positions`) or a cache of `num_blocks` blocks of `block_size` tokens.
    pub fn validate(
        &self,
        vocab_size: usize,
        max_positions: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<()> {
        let bad = |what: String| Err(WorkerError::Engine(format!("invalid batch: {what}")));
        let n = self.num_tokens();
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return bad("token, position and slot counts differ".into());
        }
        if let Some(t) = self.token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return bad(format!("token id {t} outside the vocabulary"));
        }
        if let Some(p) = self.positions.iter().find(|&&p| p as usize >= max_positions) {
            return bad(format!("position {p} beyond max_model_len"));
        }
        if self.slot_mapping.iter().any(|&s| s as usize >= num_blocks * block_size) {
            return bad("slot outside the cache".into());
        }
        let mut rows = 0;
        for s in &self.seqs {
            if s.query_start != rows || s.context_len < s.query_len || s.block_table.len() * block_size < s.context_len
            {
                return bad(format!("sequence layout {s:?}"));
            }
            if s.block_table.iter().any(|&b| b as usize >= num_blocks) {
                return bad("block id outside the cache".into());
            }
            rows += s.query_len;
        }
        if rows != n || self.logits_rows.iter().chain(&self.hidden_rows).any(|&r| r >= n) {
            return bad("rows do not match the sequences".into());
        }
        Ok(())
    }

    /// Appends one sequence's tokens: `tokens` at positions `start_pos..`, K/V going to the slots
    /// that `block_table` implies, and marks its last row for logits when `wants_logits`.
    pub fn push_seq(
        &mut self,
        tokens: &[TokenId],
        start_pos: usize,
        block_table: &[u32],
        block_size: usize,
        wants_logits: bool,
    ) {
        let query_start = self.token_ids.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = start_pos + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            self.slot_mapping.push(block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        if wants_logits && !tokens.is_empty() {
            self.logits_rows.push(query_start + tokens.len() - 1);
        }
        self.seqs.push(BatchSeq {
            query_start,
            query_len: tokens.len(),
            context_len: start_pos + tokens.len(),
            block_table: block_table.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_seq_maps_positions_to_slots_through_the_block_table() {
        let mut b = ForwardBatch::default();
        b.push_seq(&[5, 6, 7], 14, &[3, 8], 16, true);
        b.push_seq(&[9], 0, &[1], 16, false);
        assert_eq!(b.positions, vec![14, 15, 16, 0]);
        assert_eq!(b.slot_mapping, vec![3 * 16 + 14, 3 * 16 + 15, 8 * 16, 16]);
        assert_eq!(b.logits_rows, vec![2]);
        assert_eq!(b.seqs[0].context_len, 17);
        assert_eq!(b.seqs[1].query_start, 3);
    }
}
