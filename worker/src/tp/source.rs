//! One rank's view of a model's weights: a [`TensorSource`] that hands out only that rank's
//! slice of each tensor ([`ShardPlan`]), by the tensor's Hugging Face name.
//!
//! Row slices (q, k, v, gate, up, the embeddings, lm_head) are a sub-range of the tensor's bytes:
//! where the source hands out memory-mapped bytes they are borrowed, not copied, so a rank
//! touches only its rows' pages (a GGUF's q and k come un-permuted, already copied whole by the
//! source, and are sliced from that copy). Column slices (o, down) are copied out row by row (each row's slice is contiguous);
//! for GGML block types a slice must start and end on a block boundary (checked). Norms come
//! whole. Names outside the Llama block pass through unchanged.

use std::ops::Range;

use super::ShardPlan;
use crate::model::{RawTensor, TensorBytes, TensorSource};
use crate::{Result, WorkerError};

/// How a named tensor is split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    QRows,
    KvRows,
    IntermediateRows,
    IntermediateColumns,
    QColumns,
    VocabRows,
    Whole,
}

fn split_of(name: &str) -> Split {
    let tail = name.rsplit_once(".weight").map_or(name, |(head, _)| head);
    match tail.rsplit('.').next().unwrap_or("") {
        "q_proj" => Split::QRows,
        "k_proj" | "v_proj" => Split::KvRows,
        "gate_proj" | "up_proj" => Split::IntermediateRows,
        "down_proj" => Split::IntermediateColumns,
        "o_proj" => Split::QColumns,
        "embed_tokens" | "lm_head" => Split::VocabRows,
        _ => Split::Whole,
    }
}

/// `inner`'s tensors as rank `plan.rank` holds them.
pub struct ShardedSource<'a> {
    inner: &'a dyn TensorSource,
    plan: ShardPlan,
}

impl<'a> ShardedSource<'a> {
    pub fn new(inner: &'a dyn TensorSource, plan: ShardPlan) -> ShardedSource<'a> {
        ShardedSource { inner, plan }
    }
}

impl TensorSource for ShardedSource<'_> {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let t = self.inner.tensor(name)?;
        let plan = &self.plan;
        match split_of(name) {
            Split::Whole => Ok(t),
            Split::QRows => rows(t, plan.q_rows()),
            Split::KvRows => rows(t, plan.kv_rows()),
            Split::IntermediateRows => rows(t, plan.intermediate()),
            Split::VocabRows => rows(t, plan.vocab_range()),
            Split::QColumns => columns(t, plan.q_rows()),
            Split::IntermediateColumns => columns(t, plan.intermediate()),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        format!("{} (rank {} of {})", self.inner.describe(), self.plan.rank, self.plan.ranks)
    }
}

fn matrix_shape(t: &RawTensor) -> Result<(usize, usize)> {
    t.check_len()?;
    match t.shape[..] {
        [r, c] => Ok((r, c)),
        _ => Err(WorkerError::tensor(&t.name, format!("expected a matrix to shard, found shape {:?}", t.shape))),
    }
}

/// Rows `want` of `t`.
fn rows(t: RawTensor, want: Range<usize>) -> Result<RawTensor> {
    let (r, c) = matrix_shape(&t)?;
    if want.end > r {
        return Err(WorkerError::tensor(&t.name, format!("has {r} rows, the shard wants {want:?}")));
    }
    let row_bytes = t.dtype.row_bytes(c);
    let bytes = match t.bytes {
        TensorBytes::Mapped { map, range } => {
            TensorBytes::Mapped { range: range.start + want.start * row_bytes..range.start + want.end * row_bytes, map }
        }
        TensorBytes::Owned(v) => TensorBytes::Owned(v[want.start * row_bytes..want.end * row_bytes].to_vec()),
    };
    Ok(RawTensor { name: t.name, dtype: t.dtype, shape: vec![want.len(), c], bytes })
}

/// Columns `want` of `t`, every row's slice copied.
fn columns(t: RawTensor, want: Range<usize>) -> Result<RawTensor> {
    let (r, c) = matrix_shape(&t)?;
    if want.end > c {
        return Err(WorkerError::tensor(&t.name, format!("has {c} columns, the shard wants {want:?}")));
    }
    let unit = match t.dtype {
        crate::model::TensorDType::Ggml(g) => g.block_size(),
        _ => 1,
    };
    if !want.start.is_multiple_of(unit) || !want.end.is_multiple_of(unit) {
        return Err(WorkerError::invalid(
            "tensor_parallel_size",
            format!(
                "{}: a rank's columns {want:?} do not fall on its {:?} blocks of {unit} values; choose a size that splits them on whole blocks",
                t.name, t.dtype
            ),
        ));
    }
    let (row_bytes, from, to) = (t.dtype.row_bytes(c), t.dtype.row_bytes(want.start), t.dtype.row_bytes(want.end));
    let src = t.bytes.as_slice();
    let mut out = Vec::with_capacity(r * (to - from));
    for row in 0..r {
        out.extend_from_slice(&src[row * row_bytes + from..row * row_bytes + to]);
    }
    Ok(RawTensor { name: t.name, dtype: t.dtype, shape: vec![r, want.len()], bytes: TensorBytes::Owned(out) })
}
