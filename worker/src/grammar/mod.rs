//! Structured outputs: constraining a sequence's tokens to a JSON schema, a regex, a list of
//! choices or a Lark grammar, with `llguidance` as the grammar engine.
//!
//! What this module owns:
//! - [`Constraint`]: what a request asks for, as the engine and the wire carry it.
//! - [`GrammarCompiler`] (one per replica): the token trie built from the model's tokenizer
//!   (`toktrie_env`), llguidance's parser factory with its limits set, and a bounded LRU cache of
//!   compiled grammars keyed by the constraint's text (`compiler`). Compiling is blocking work
//!   bounded by llguidance's fuel and size limits and by a deadline (`deadline`: a watchdog that
//!   cancels what the fuel does not bound); callers run it off the async runtime.
//! - [`SeqGrammar`] (one per constrained sequence, `n > 1` choices each their own): the matcher
//!   state, advanced by every accepted token, and the sequence's next-token mask, both done on the
//!   engine's [`MaskWorkers`] threads while the forward pass runs (`mask`).
//! - [`ReasoningGate`]: a reasoning model's sequence samples freely until it ends its reasoning;
//!   the matcher starts after that (`gate`).
//!
//! Invariants:
//! - A mask is a packed bitmask over the model's vocabulary (the logits row width): `u32` words,
//!   bit `i % 32` of word `i / 32` set iff token `i` may come next. Ids the tokenizer does not
//!   have, and special tokens other than end-of-sequence, are never allowed.
//! - End-of-sequence ids (the tokenizer's, generation_config's included) are allowed exactly when
//!   the grammar accepts what was generated so far.
//! - A sequence's mask always describes the state after every token it has accepted: the engine
//!   waits for it before sampling, and a token handed to the mask workers is fed to the matcher
//!   before the next mask is computed (under the cell's lock: nobody sees the state between).
//!   The engine thread itself feeds only a token that ends its choice.
//!   Preemption keeps the state (the generated tokens are kept and only their KV is recomputed),
//!   so a recomputed sequence resumes with the same matcher.

mod cache;
mod compiler;
mod deadline;
mod gate;
mod mask;
mod toktrie_env;

#[cfg(test)]
mod tests;

pub use compiler::{CompiledGrammar, GrammarCompiler, GrammarLimits};
pub use gate::{ReasoningGate, reasoning_ended};
pub use mask::{Feed, MaskWorkers, SeqGrammar, TokenMask, apply_mask, first_allowed, mask_words};

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintKind {
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

/// A request's constraint and the options vLLM allows beside it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraint {
    pub kind: ConstraintKind,
    /// JSON: no whitespace between tokens beyond the separators (vLLM's `disable_any_whitespace`).
    pub disable_any_whitespace: bool,
    /// JSON: objects without `additionalProperties` get `false` (vLLM's option of that name).
    pub disable_additional_properties: bool,
    /// JSON: the whitespace allowed between tokens, as a regex (vLLM's `whitespace_pattern`).
    pub whitespace_pattern: Option<String>,
    /// The API field the constraint came from, named in errors (`response_format`, ...).
    pub param: String,
}

impl Constraint {
    /// A constraint with vLLM's default options.
    pub fn new(kind: ConstraintKind, param: impl Into<String>) -> Constraint {
        Constraint {
            kind,
            disable_any_whitespace: false,
            disable_additional_properties: false,
            whitespace_pattern: None,
            param: param.into(),
        }
    }

    /// The cache key: everything that changes the compiled grammar (not `param`).
    pub fn cache_key(&self) -> String {
        let (tag, text) = match &self.kind {
            ConstraintKind::JsonSchema(s) => ("json", s.clone()),
            ConstraintKind::JsonObject => ("json_object", String::new()),
            ConstraintKind::Regex(s) => ("regex", s.clone()),
            ConstraintKind::Choice(c) => ("choice", serde_json::to_string(c).unwrap_or_default()),
            ConstraintKind::Lark(s) => ("lark", s.clone()),
        };
        format!(
            "{tag}\u{0}{}{}\u{0}{}\u{0}{text}",
            u8::from(self.disable_any_whitespace),
            u8::from(self.disable_additional_properties),
            self.whitespace_pattern.as_deref().unwrap_or("")
        )
    }
}

/// Why a constraint cannot be used; the message is for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The constraint does not compile (bad schema, regex or grammar) or hits a limit.
    #[error("{0}")]
    Invalid(String),
    /// Structured outputs cannot run on this model (its tokenizer cannot be turned into a trie).
    #[error("structured outputs are not available for this model: {0}")]
    Unavailable(String),
}
