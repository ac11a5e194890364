//! Rotary position embeddings: the frequencies a checkpoint's rope settings imply. One module per
//! `rope_type` (transformers' `ROPE_INIT_FUNCTIONS`: `linear`, `dynamic`, `llama3`, `yarn`,
//! `longrope`; `default` is no rescaling), plus GGUF's per-frequency divisors, and the registry
//! [`ROPE_TYPES`] by the name configs use.
//!
//! Contract:
//! - A [`Rope`] is `rope_theta` plus at most one [`RopeScaling`]. [`Rope::frequencies`] gives the
//!   `head_dim / 2` inverse frequencies (element `i` and `i + head_dim / 2` of every query and key
//!   head rotate by `position * inv_freq[i]`: Hugging Face's `rotate_half` layout) and the
//!   attention factor that multiplies both cos and sin (yarn and longrope; 1 for the others),
//!   computed with transformers' formulas in f64. Both go into the one `RopeTable`
//!   (`kernels/cpu/ops.rs`) that the CPU path reads and the CUDA path uploads, so the devices
//!   rotate identically.
//! - Frequencies depend on the config and `max_model_len` only, never on how long a sequence is
//!   so far: the KV cache holds keys rotated once, when they were computed. Where transformers
//!   recomputes them from the current length, Lumen does what vLLM does (its API is our contract):
//!   - `dynamic` (NTK): transformers keeps the plain base until a sequence passes
//!     `max_position_embeddings`, then grows it with the length. Lumen (like vLLM) uses, for every
//!     position from the first, the base transformers reaches at `factor * max_position_embeddings`
//!     tokens: prompts of exactly that length match transformers, shorter ones do not.
//!   - `longrope`: transformers uses `short_factor` while a sequence fits in
//!     `original_max_position_embeddings` and `long_factor` beyond it. Lumen (like vLLM) uses
//!     `long_factor` for every sequence when `max_model_len > original_max_position_embeddings`,
//!     else `short_factor`; sequences on the same side of that line as `max_model_len` match.
//! - Parameters are read strictly: every key of the rope dict must be one the type's formula reads,
//!   or one the config reader checks (`rope_type`/`type`, `rope_theta`, `partial_rotary_factor`),
//!   or informational (`finetuned`); anything else is an error naming it, and an unknown type is an
//!   error that lists the known ones. Nothing that would change the rotation is dropped in silence.

mod dynamic;
mod freq_factors;
mod linear;
mod llama3;
mod longrope;
mod yarn;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

pub use freq_factors::FreqFactors;

use crate::{Result, WorkerError};

/// What a scaling's formula may read besides its own parameters.
#[derive(Clone, Copy, Debug)]
pub struct RopeInputs {
    pub theta: f64,
    /// Rotary dimension (the head size: partial rotary embeddings are refused at load).
    pub dim: usize,
    pub max_position_embeddings: usize,
    /// The longest sequence this server runs (sizes the tables; longrope's switch).
    pub max_model_len: usize,
}

/// One way of rescaling the rotary frequencies (a `rope_type` other than `default`).
pub trait RopeScaling: fmt::Debug + Send + Sync {
    /// The `rope_type` users write.
    fn name(&self) -> &'static str;
    /// Rescales `inv_freq` (on entry `theta^(-2i/dim)`, `i < dim / 2`) in place and returns the
    /// factor cos and sin are multiplied by.
    fn apply(&self, inputs: &RopeInputs, inv_freq: &mut [f64]) -> f64;
}

/// Parses one type's parameters.
type Parse = fn(&RopeParams<'_>) -> Result<Arc<dyn RopeScaling>>;

/// Every `rope_type` Lumen implements, by name (`default`: no rescaling).
pub const ROPE_TYPES: &[(&str, Option<Parse>)] = &[
    ("default", None),
    ("linear", Some(linear::parse)),
    ("dynamic", Some(dynamic::parse)),
    ("llama3", Some(llama3::parse)),
    ("yarn", Some(yarn::parse)),
    ("longrope", Some(longrope::parse)),
];

/// Keys of a rope dict that the config reader checks itself, or that change nothing.
const NOT_FORMULA_KEYS: &[&str] = &["rope_type", "type", "rope_theta", "partial_rotary_factor", "finetuned"];

/// `rope_theta` and the scaling it is used with.
#[derive(Clone, Debug)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<Arc<dyn RopeScaling>>,
}

/// Equal when theta and the scaling's type and parameters are (compared through their derived
/// `Debug`, which prints every field, floats to the last bit).
impl PartialEq for Rope {
    fn eq(&self, other: &Rope) -> bool {
        self.theta == other.theta && format!("{:?}", self.scaling) == format!("{:?}", other.scaling)
    }
}

/// The rotation a model applies: inverse frequencies and the factor on cos/sin.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

impl Rope {
    /// Plain rotary embeddings with base `theta`.
    pub fn plain(theta: f64) -> Rope {
        Rope { theta, scaling: None }
    }

    /// `rope_theta` with the scaling `params` names (`rope_type`, or the older `type`; `default`
    /// when neither is present).
    pub fn parse(theta: f64, params: &RopeParams<'_>) -> Result<Rope> {
        let kind = params.rope_type()?;
        let parse = ROPE_TYPES.iter().find(|(name, _)| *name == kind).ok_or_else(|| {
            let known: Vec<&str> = ROPE_TYPES.iter().map(|(n, _)| *n).collect();
            WorkerError::UnsupportedConfig {
                key: params.key("rope_type"),
                value: format!("{kind:?}"),
                reason: format!("unknown rope type (Lumen implements: {})", known.join(", ")),
            }
        })?;
        let scaling = match parse.1 {
            Some(parse) => Some(parse(params)?),
            None => None,
        };
        params.refuse_unread(&kind)?;
        if !(theta.is_finite() && theta > 1.0) {
            return Err(WorkerError::UnsupportedConfig {
                key: params.key("rope_theta"),
                value: theta.to_string(),
                reason: "the rotary base must be a finite number above 1".into(),
            });
        }
        Ok(Rope { theta, scaling })
    }

    /// The type's name (`default` when unscaled).
    pub fn type_name(&self) -> &'static str {
        self.scaling.as_ref().map_or("default", |s| s.name())
    }

    /// Inverse frequencies and attention factor for heads of `dim` (see the module contract).
    pub fn frequencies(&self, dim: usize, max_position_embeddings: usize, max_model_len: usize) -> RopeFrequencies {
        let mut inv: Vec<f64> = (0..dim / 2).map(|i| self.theta.powf(-2.0 * i as f64 / dim as f64)).collect();
        let inputs = RopeInputs { theta: self.theta, dim, max_position_embeddings, max_model_len };
        let attention_factor = self.scaling.as_ref().map_or(1.0, |s| s.apply(&inputs, &mut inv));
        RopeFrequencies { inv_freq: inv.iter().map(|&f| f as f32).collect(), attention_factor: attention_factor as f32 }
    }
}

/// One rope dict being parsed: its values, where it came from (for messages), the model sizes
/// the formulas need, and which keys a parser has read.
pub struct RopeParams<'a> {
    section: &'a str,
    map: &'a Map<String, Value>,
    /// Rotary dimension (head size).
    pub dim: usize,
    pub max_position_embeddings: usize,
    /// A top-level `original_max_position_embeddings` (Phi-3 style), used when the dict has none.
    pub top_level_original_max: Option<f64>,
    read: RefCell<BTreeSet<String>>,
}

impl<'a> RopeParams<'a> {
    /// `map` is the dict found under `section` (`rope_parameters`, `rope_scaling`, ...).
    pub fn new(section: &'a str, map: &'a Map<String, Value>, dim: usize, max_position_embeddings: usize) -> Self {
        RopeParams {
            section,
            map,
            dim,
            max_position_embeddings,
            top_level_original_max: None,
            read: RefCell::new(BTreeSet::new()),
        }
    }

    /// `section.key`, as error messages name it.
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.section)
    }

    fn unsupported(&self, key: &str, value: impl fmt::Display, reason: impl Into<String>) -> WorkerError {
        WorkerError::UnsupportedConfig { key: self.key(key), value: value.to_string(), reason: reason.into() }
    }

    fn value(&self, key: &str) -> Option<&'a Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is in the dict at all (even as null).
    pub fn present(&self, key: &str) -> bool {
        self.read.borrow_mut().insert(key.to_string());
        self.map.contains_key(key)
    }

    /// The type name: `rope_type`, else the older `type`, else `default`.
    pub fn rope_type(&self) -> Result<String> {
        let name = |key: &str| match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.unsupported(key, other, "must be a string")),
        };
        match (name("rope_type")?, name("type")?) {
            (Some(a), Some(b)) if a != b => Err(WorkerError::ConflictingConfig {
                first: self.key("rope_type"),
                first_value: format!("{a:?}"),
                second: self.key("type"),
                second_value: format!("{b:?}"),
            }),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Ok("default".into()),
        }
    }

    /// An optional number.
    pub fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.unsupported(key, v, "must be a number")),
        }
    }

    /// A number that must be present.
    pub fn required(&self, key: &str) -> Result<f64> {
        self.number(key)?.ok_or_else(|| self.unsupported(key, "missing", "this rope type needs it"))
    }

    /// A number that must be present, finite and positive.
    pub fn positive(&self, key: &str) -> Result<f64> {
        let x = self.required(key)?;
        self.check_positive(key, x)
    }

    /// `x` (read from `key`) if it is finite and positive.
    pub fn check_positive(&self, key: &str, x: f64) -> Result<f64> {
        if x.is_finite() && x > 0.0 { Ok(x) } else { Err(self.unsupported(key, x, "must be a positive number")) }
    }

    /// An optional boolean.
    pub fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.unsupported(key, v, "must be true or false")),
        }
    }

    /// A list of `dim / 2` positive numbers that must be present.
    pub fn per_frequency(&self, key: &str) -> Result<Vec<f64>> {
        let v = self.value(key).ok_or_else(|| self.unsupported(key, "missing", "this rope type needs it"))?;
        let list: Option<Vec<f64>> = v.as_array().and_then(|a| a.iter().map(Value::as_f64).collect());
        let list = list.ok_or_else(|| self.unsupported(key, "(not a list of numbers)", "must be a list of numbers"))?;
        if list.len() != self.dim / 2 || list.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(self.unsupported(
                key,
                format!("{} values", list.len()),
                format!("needs {} positive numbers, one per rotary frequency (head_dim / 2)", self.dim / 2),
            ));
        }
        Ok(list)
    }

    /// `original_max_position_embeddings` from the dict, else the top level, else (as transformers
    /// does) `max_position_embeddings`; the dict and the top level must agree.
    pub fn original_max_position_embeddings(&self) -> Result<usize> {
        const KEY: &str = "original_max_position_embeddings";
        let value = match (self.number(KEY)?, self.top_level_original_max) {
            (Some(inner), Some(top)) if inner != top => {
                return Err(WorkerError::ConflictingConfig {
                    first: KEY.into(),
                    first_value: top.to_string(),
                    second: self.key(KEY),
                    second_value: inner.to_string(),
                });
            }
            (inner, top) => inner.or(top),
        };
        match value {
            None => Ok(self.max_position_embeddings),
            Some(x) if x >= 1.0 && x.fract() == 0.0 => Ok(x as usize),
            Some(x) => Err(self.unsupported(KEY, x, "must be a positive integer")),
        }
    }

    /// Refuses keys that no part of `kind`'s formula read.
    fn refuse_unread(&self, kind: &str) -> Result<()> {
        let read = self.read.borrow();
        let unread =
            |(k, v): &(&String, &Value)| !read.contains(*k) && !NOT_FORMULA_KEYS.contains(&k.as_str()) && !v.is_null();
        match self.map.iter().find(unread).map(|(k, _)| k) {
            Some(k) => Err(self.unsupported(
                k,
                &self.map[k],
                format!("transformers' `{kind}` rotary formula does not use it; Lumen will not guess what it means"),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
