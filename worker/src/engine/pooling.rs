//! Pooling (embeddings), as vLLM names its options: `--runner pooling` serves a model for pooling
//! instead of generation, `--convert embed` adapts a causal LM to it (a Llama `*ForCausalLM`
//! has no pooler of its own), and `--pooler-config '{"pooling_type": "MEAN", "normalize":
//! true}'` chooses how a prompt's final hidden states (after the final RMSNorm) become one
//! vector. The default for a converted causal LM is vLLM's: `LAST` token, L2-normalized.
//!
//! [`PoolAccumulator`] is the math: rows arrive prompt position by prompt position, chunk by
//! chunk (chunked prefill), each position at most once (the scheduler keeps count across
//! preemption); `MEAN` sums them and divides at the end, `LAST` and `CLS` keep the one row they
//! want. The sum is kept in f64 so the mean does not depend on how the prompt was chunked.

use serde::{Deserialize, Serialize};

use crate::WorkerError;

/// Which runner serves the model (vLLM's `--runner`). `Auto` goes by the architecture:
/// generation for a Llama causal LM (pooling when `--convert embed` asks for it). (Variants carry
/// no `///` docs: clap would print them as a long "possible values" list in `--help`.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    #[default]
    Auto,
    Generate,
    Pooling,
}

/// How a model is adapted to a pooling task (vLLM's `--convert`). `Auto` is `Embed` under the
/// pooling runner (a causal LM has no pooler of its own), else `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Convert {
    #[default]
    Auto,
    None,
    Embed,
}

/// How the hidden states of a prompt become one vector (vLLM's `pooling_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PoolingType {
    /// The last prompt token's hidden state (the only one that has seen the whole prompt in a
    /// causal model).
    Last,
    /// The mean over every prompt token.
    Mean,
    /// The first token's hidden state.
    Cls,
}

/// vLLM's `--pooler-config` (JSON), the fields Lumen acts on; any other field is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolerConfig {
    /// `LAST`, `MEAN` or `CLS`; default `LAST`.
    pub pooling_type: Option<PoolingType>,
    /// L2-normalize the pooled vector; default true.
    pub normalize: Option<bool>,
}

impl PoolerConfig {
    /// Parses the flag's JSON (`{"pooling_type": "MEAN", "normalize": true}`).
    pub fn parse_json(s: &str) -> Result<PoolerConfig, String> {
        serde_json::from_str(s).map_err(|e| {
            format!("{e} (a JSON object with `pooling_type` (LAST, MEAN or CLS) and/or `normalize` (true or false))")
        })
    }
}

/// How one request's prompt is pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingParams {
    pub pooling_type: PoolingType,
    pub normalize: bool,
}

impl PoolingParams {
    /// The pooling of a model served with `runner`, `convert` and `config`; `None` when it is
    /// served for generation. A pooling runner without a conversion is refused: a Llama causal
    /// LM has no pooler of its own.
    pub fn of_model(
        runner: Runner,
        convert: Convert,
        config: Option<PoolerConfig>,
    ) -> Result<Option<Self>, WorkerError> {
        let pooling = match (runner, convert) {
            (Runner::Pooling, Convert::Auto | Convert::Embed) | (Runner::Auto, Convert::Embed) => true,
            (Runner::Auto | Runner::Generate, Convert::Auto | Convert::None) => false,
            (Runner::Pooling, Convert::None) => {
                return Err(WorkerError::invalid(
                    "convert",
                    "`--runner pooling` with `--convert none`: a Llama causal LM has no pooler of its own; use `--convert embed` (or auto)",
                ));
            }
            (Runner::Generate, Convert::Embed) => {
                return Err(WorkerError::invalid("convert", "`--convert embed` needs `--runner pooling` (or auto)"));
            }
        };
        if !pooling {
            if config.is_some() {
                return Err(WorkerError::invalid("pooler_config", "a pooler config needs `--runner pooling`"));
            }
            return Ok(None);
        }
        let config = config.unwrap_or_default();
        Ok(Some(PoolingParams {
            pooling_type: config.pooling_type.unwrap_or(PoolingType::Last),
            normalize: config.normalize.unwrap_or(true),
        }))
    }

    /// The prompt positions whose hidden states this pooling reads, for a prompt of `len` tokens.
    pub fn positions(&self, len: usize) -> std::ops::Range<usize> {
        match self.pooling_type {
            PoolingType::Last => len.saturating_sub(1)..len,
            PoolingType::Mean => 0..len,
            PoolingType::Cls => 0..len.min(1),
        }
    }
}

/// One request's pooled vector while its prefill runs.
#[derive(Clone, Debug)]
pub struct PoolAccumulator {
    params: PoolingParams,
    sum: Vec<f64>,
    rows: usize,
    wanted: usize,
}

impl PoolAccumulator {
    /// For a prompt of `prompt_len` tokens and hidden states of `hidden` values.
    pub fn new(params: PoolingParams, prompt_len: usize, hidden: usize) -> Self {
        PoolAccumulator { params, sum: vec![0.0; hidden], rows: 0, wanted: params.positions(prompt_len).len() }
    }

    /// Adds the hidden state of one wanted prompt position.
    pub fn add(&mut self, row: &[f32]) {
        for (s, &x) in self.sum.iter_mut().zip(row) {
            *s += f64::from(x);
        }
        self.rows += 1;
    }

    /// True once every wanted position was added.
    pub fn is_complete(&self) -> bool {
        self.rows >= self.wanted
    }

    /// The pooled vector (the mean of the rows added, normalized when asked).
    pub fn finish(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        let mut out: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        if self.params.normalize {
            let norm = out.iter().map(|x| x * x).sum::<f64>().sqrt();
            // As torch's F.normalize: a zero vector stays zero.
            let scale = 1.0 / norm.max(1e-12);
            out.iter_mut().for_each(|x| *x *= scale);
        }
        out.into_iter().map(|x| x as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pooling_type: PoolingType, normalize: bool) -> PoolingParams {
        PoolingParams { pooling_type, normalize }
    }

    fn rows(n: usize, h: usize) -> Vec<Vec<f32>> {
        (0..n).map(|r| (0..h).map(|c| ((r * 7 + c * 3) % 11) as f32 - 4.5 + r as f32 * 0.25).collect()).collect()
    }

    #[test]
    fn mean_over_chunks_equals_mean_over_one_chunk() {
        let rows = rows(37, 8);
        let mut whole = PoolAccumulator::new(params(PoolingType::Mean, false), 37, 8);
        rows.iter().for_each(|r| whole.add(r));
        let mut chunked = PoolAccumulator::new(params(PoolingType::Mean, false), 37, 8);
        for chunk in rows.chunks(5) {
            assert!(!chunked.is_complete());
            chunk.iter().for_each(|r| chunked.add(r));
        }
        assert!(chunked.is_complete());
        assert_eq!(whole.finish(), chunked.finish());
        let want: Vec<f32> =
            (0..8).map(|c| rows.iter().map(|r| r[c] as f64).sum::<f64>() / 37.0).map(|x| x as f32).collect();
        for (a, b) in whole.finish().iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn last_and_cls_read_one_position() {
        assert_eq!(params(PoolingType::Last, true).positions(9), 8..9);
        assert_eq!(params(PoolingType::Cls, true).positions(9), 0..1);
        assert_eq!(params(PoolingType::Mean, true).positions(9), 0..9);
        let mut last = PoolAccumulator::new(params(PoolingType::Last, false), 9, 3);
        assert!(!last.is_complete());
        last.add(&[1.0, -2.0, 3.5]);
        assert!(last.is_complete());
        assert_eq!(last.finish(), vec![1.0, -2.0, 3.5]);
    }

    #[test]
    fn normalization_gives_a_unit_vector_in_the_same_direction() {
        let mut acc = PoolAccumulator::new(params(PoolingType::Last, true), 1, 2);
        acc.add(&[3.0, 4.0]);
        assert_eq!(acc.finish(), vec![0.6, 0.8]);
        let mut zero = PoolAccumulator::new(params(PoolingType::Last, true), 1, 2);
        zero.add(&[0.0, 0.0]);
        assert_eq!(zero.finish(), vec![0.0, 0.0], "a zero vector is not turned into NaN");
    }

    #[test]
    fn runner_and_convert_resolve_as_vllm_does() {
        let last = PoolingParams { pooling_type: PoolingType::Last, normalize: true };
        assert_eq!(PoolingParams::of_model(Runner::Auto, Convert::Auto, None).unwrap(), None);
        assert_eq!(PoolingParams::of_model(Runner::Pooling, Convert::Auto, None).unwrap(), Some(last));
        assert_eq!(PoolingParams::of_model(Runner::Auto, Convert::Embed, None).unwrap(), Some(last));
        let mean = PoolerConfig::parse_json(r#"{"pooling_type": "MEAN", "normalize": false}"#).unwrap();
        assert_eq!(
            PoolingParams::of_model(Runner::Pooling, Convert::Embed, Some(mean)).unwrap(),
            Some(PoolingParams { pooling_type: PoolingType::Mean, normalize: false })
        );
        assert!(PoolingParams::of_model(Runner::Pooling, Convert::None, None).is_err());
        assert!(PoolingParams::of_model(Runner::Generate, Convert::Embed, None).is_err());
        assert!(PoolingParams::of_model(Runner::Generate, Convert::Auto, Some(mean)).is_err());
        let err = PoolerConfig::parse_json(r#"{"pooling_type": "ALL"}"#).unwrap_err();
        assert!(err.contains("LAST, MEAN or CLS"), "{err}");
        assert!(PoolerConfig::parse_json(r#"{"softmax": true}"#).is_err(), "unknown fields are refused");
    }
}
