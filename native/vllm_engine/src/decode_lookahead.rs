//! The inputs of a plain decode step as a captured decode graph reads them, and the step
//! that follows when every row goes on by one token. The CUDA decode lookahead
//! (backend/cuda/graphs.rs, vLLM's async scheduling for greedy decode) launches that next
//! step before the host knows this step's tokens, feeding it this step's argmax on the
//! device; its result is used only when the engine then asks for exactly those inputs.

use crate::error::{EngineError, Result};
use crate::models::ForwardBatch;

/// One row per sequence: the token it feeds, its position, and the KV blocks that hold
/// positions 0..=position (only those: a table's spare blocks are not inputs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeInputs {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Row r's blocks are `blocks[starts[r]..starts[r + 1]]`.
    starts: Vec<usize>,
    blocks: Vec<u32>,
}

impl DecodeInputs {
    /// The inputs of `batch`, which must be plain decode rows (one new token each, in order).
    pub fn from_batch(batch: &ForwardBatch, block_size: usize) -> Result<Self> {
        let mut inputs = DecodeInputs {
            starts: vec![0],
            ..Default::default()
        };
        for (r, seq) in batch.seqs.iter().enumerate() {
            let position = batch.positions.get(r).copied().unwrap_or(usize::MAX);
            let blocks = seq.context_len.div_ceil(block_size.max(1));
            if seq.query_len != 1
                || seq.query_start != r
                || position + 1 != seq.context_len
                || seq.block_table.len() < blocks
            {
                return Err(EngineError::internal(format!(
                    "forward batch: decode row {r} is inconsistent (position {position}, context {}, {} blocks)",
                    seq.context_len,
                    seq.block_table.len()
                )));
            }
            inputs.push(batch.token_ids[r], position, &seq.block_table[..blocks])?;
        }
        Ok(inputs)
    }

    fn push(&mut self, token: u32, position: usize, blocks: &[u32]) -> Result<()> {
        let position = u32::try_from(position).map_err(|_| EngineError::internal("decode position past u32"))?;
        self.tokens.push(token);
        self.positions.push(position);
        self.blocks.extend_from_slice(blocks);
        self.starts.push(self.blocks.len());
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    pub fn blocks(&self, row: usize) -> &[u32] {
        &self.blocks[self.starts[row]..self.starts[row + 1]]
    }

    fn row(&self, r: usize) -> (u32, u32, &[u32]) {
        (self.tokens[r], self.positions[r], self.blocks(r))
    }

    /// Where each of these rows is among `launched`'s rows, when these rows are some of
    /// them in the same order (sequences that finished or were preempted dropped out):
    /// then `launched`'s results for them are theirs.
    pub fn rows_within(&self, launched: &DecodeInputs) -> Option<Vec<usize>> {
        let mut at = Vec::with_capacity(self.rows());
        let mut j = 0;
        for r in 0..self.rows() {
            while j < launched.rows() && launched.row(j) != self.row(r) {
                j += 1;
            }
            if j == launched.rows() {
                return None;
            }
            at.push(j);
            j += 1;
        }
        Some(at)
    }

    /// The next step's inputs, `batch` (these inputs' batch) gone on by one token a row,
    /// with tokens still to be filled in (0): None when some row's next position passes
    /// `max_model_len` or has no block in its table yet (the scheduler allocates it later).
    pub fn next(&self, batch: &ForwardBatch, block_size: usize, max_model_len: usize) -> Option<DecodeInputs> {
        let mut next = DecodeInputs {
            starts: vec![0],
            ..Default::default()
        };
        for (r, seq) in batch.seqs.iter().enumerate() {
            let position = *self.positions.get(r)? as usize + 1;
            let blocks = (position + 1).div_ceil(block_size.max(1));
            if position >= max_model_len || seq.block_table.len() < blocks {
                return None;
            }
            next.push(0, position, &seq.block_table[..blocks]).ok()?;
        }
        (next.rows() == self.rows()).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::SeqSlice;

    /// Decode rows (token, position, table) with block size 4.
    fn batch(rows: &[(u32, usize, &[u32])]) -> ForwardBatch {
        let mut b = ForwardBatch::default();
        for (r, &(token, position, table)) in rows.iter().enumerate() {
            b.token_ids.push(token);
            b.positions.push(position);
            b.seqs.push(SeqSlice {
                query_start: r,
                query_len: 1,
                context_len: position + 1,
                block_table: table.to_vec(),
                want_logits: true,
                logits_for_all_tokens: false,
                lora_slot: None,
            });
        }
        b
    }

    #[test]
    fn inputs_keep_only_the_blocks_up_to_the_position() {
        let b = batch(&[(7, 5, &[3, 9, 11]), (8, 0, &[4])]);
        let inputs = DecodeInputs::from_batch(&b, 4).unwrap();
        assert_eq!(inputs.tokens, vec![7, 8]);
        assert_eq!(inputs.positions, vec![5, 0]);
        assert_eq!(inputs.blocks(0), &[3, 9]);
        assert_eq!(inputs.blocks(1), &[4]);
    }

    #[test]
    fn the_next_step_moves_every_row_on_by_one_position() {
        let b = batch(&[(7, 5, &[3, 9]), (8, 0, &[4])]);
        let inputs = DecodeInputs::from_batch(&b, 4).unwrap();
        let next = inputs.next(&b, 4, 64).unwrap();
        assert_eq!(next.positions, vec![6, 1]);
        assert_eq!(next.tokens, vec![0, 0]);
        assert_eq!(next.blocks(0), &[3, 9]);
        // The engine's next batch: the sampled tokens appended, one position on.
        let mut filled = next.clone();
        filled.tokens = vec![70, 80];
        let real = batch(&[(70, 6, &[3, 9]), (80, 1, &[4])]);
        assert_eq!(DecodeInputs::from_batch(&real, 4).unwrap(), filled);
        // Any other token, position or block is another step.
        for other in [
            batch(&[(71, 6, &[3, 9]), (80, 1, &[4])]),
            batch(&[(70, 6, &[3, 10]), (80, 1, &[4])]),
            batch(&[(70, 6, &[3, 9])]),
        ] {
            assert_ne!(DecodeInputs::from_batch(&other, 4).unwrap(), filled);
        }
    }

    #[test]
    fn no_next_step_without_a_block_for_it_or_past_the_model_length() {
        // Position 7 fills block 1; position 8 would need a third block.
        let b = batch(&[(7, 7, &[3, 9]), (8, 0, &[4])]);
        let inputs = DecodeInputs::from_batch(&b, 4).unwrap();
        assert_eq!(inputs.next(&b, 4, 64), None);
        // With the block already in the table (allocated ahead) it goes on.
        let ahead = batch(&[(7, 7, &[3, 9, 12]), (8, 0, &[4])]);
        let next = DecodeInputs::from_batch(&ahead, 4)
            .unwrap()
            .next(&ahead, 4, 64)
            .unwrap();
        assert_eq!(next.blocks(0), &[3, 9, 12]);
        // Position 8 is the model's length: nothing past it.
        assert_eq!(DecodeInputs::from_batch(&ahead, 4).unwrap().next(&ahead, 4, 8), None);
    }

    #[test]
    fn prefill_rows_are_not_decode_inputs() {
        let mut b = batch(&[(7, 5, &[3, 9])]);
        b.seqs[0].query_len = 2;
        assert!(DecodeInputs::from_batch(&b, 4).is_err());
        let short = batch(&[(7, 5, &[3])]);
        assert!(DecodeInputs::from_batch(&short, 4).is_err());
    }

    #[test]
    fn rows_that_dropped_out_leave_the_others_matched_in_order() {
        let launched = DecodeInputs::from_batch(&batch(&[(1, 4, &[3, 9]), (2, 0, &[4]), (3, 2, &[5])]), 4).unwrap();
        let same = launched.clone();
        assert_eq!(same.rows_within(&launched), Some(vec![0, 1, 2]));
        let without_middle = DecodeInputs::from_batch(&batch(&[(1, 4, &[3, 9]), (3, 2, &[5])]), 4).unwrap();
        assert_eq!(without_middle.rows_within(&launched), Some(vec![0, 2]));
        // A new row, a changed row or another order is not the launched step.
        let added = DecodeInputs::from_batch(&batch(&[(1, 4, &[3, 9]), (9, 1, &[6])]), 4).unwrap();
        assert_eq!(added.rows_within(&launched), None);
        let reordered = DecodeInputs::from_batch(&batch(&[(3, 2, &[5]), (1, 4, &[3, 9])]), 4).unwrap();
        assert_eq!(reordered.rows_within(&launched), None);
        let moved = DecodeInputs::from_batch(&batch(&[(1, 4, &[3, 9]), (2, 1, &[4])]), 4).unwrap();
        assert_eq!(moved.rows_within(&launched), None);
        assert_eq!(DecodeInputs::default().rows_within(&launched), Some(vec![]));
    }
}
