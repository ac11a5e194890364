//! The packed input of one engine step, independent of the device that runs it.
//!
//! Tokens of all scheduled sequences are concatenated: sequence `s` owns rows
//! `query_start..query_start + query_len`. Each token carries its absolute position and the cache
//! slot its K/V goes to (`block * block_size + offset`). Logits are produced only for the rows in
//! `logits_rows` (the last token of each sequence that samples this step), in that order.

use crate::TokenId;

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

/// Everything a forward pass needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardBatch {
    pub token_ids: Vec<TokenId>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<BatchSeq>,
    /// Rows whose logits are wanted, in output order.
    pub logits_rows: Vec<usize>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
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
