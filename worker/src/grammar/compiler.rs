//! Compiling constraints into llguidance matchers, with a bounded cache keyed by their text.
//!
//! Contract of [`GrammarCompiler::compile`]:
//! - Blocking (milliseconds for common schemas; bounded by [`GrammarLimits::parser`]: lexer fuel,
//!   grammar size, lexer states, Earley items per step; and by [`GrammarLimits::compile_timeout`]
//!   where the fuel does not reach, see `deadline`), so callers run it off the async runtime.
//! - The result is a [`CompiledGrammar`]: a matcher in its start state whose first mask has been
//!   computed (which also proves the constraint allows some output), cloned for each sequence.
//! - Results, errors included, are cached under [`Constraint::cache_key`] (LRU, at most
//!   [`GrammarLimits::cache_capacity`] entries), so a repeated schema, or a repeated hostile one,
//!   costs one compilation.
//! - The trie and the parser factory are built on first use (a fraction of a second for a
//!   128k vocabulary): a replica that never sees a constrained request never pays for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Map, Value, json};

use super::cache::LruCache;
use super::deadline::Deadline;
use super::toktrie_env::LumenTokEnv;
use super::{Constraint, ConstraintKind, GrammarError};
use crate::tokenizer::Tokenizer;

/// Bounds on compilation and on the cache.
#[derive(Clone, Debug)]
pub struct GrammarLimits {
    /// Compiled grammars (and compile errors) kept.
    pub cache_capacity: usize,
    /// llguidance's limits, applied to compilation and to every mask computation.
    pub parser: ParserLimits,
    /// The longest the start state's first mask may take to compute (beyond llguidance's fuel).
    pub compile_timeout: Duration,
    /// The longest one mask computation or one token's advance may take mid-generation; past
    /// it the sequence's request fails (its output could no longer be guaranteed).
    pub step_timeout: Duration,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        // llguidance's defaults (the ones vLLM runs with), without the grammar echoed in errors:
        // a client's error message should not carry a multi-megabyte schema back.
        let parser = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        // Masks take microseconds to a few milliseconds; the timeouts only stop runaway work.
        GrammarLimits {
            cache_capacity: 64,
            parser,
            compile_timeout: Duration::from_secs(5),
            step_timeout: Duration::from_secs(2),
        }
    }
}

type Cached = Result<Arc<CompiledGrammar>, GrammarError>;

/// One replica's grammar compiler (see the module docs).
pub struct GrammarCompiler {
    tokenizer: Tokenizer,
    vocab_size: usize,
    limits: GrammarLimits,
    factory: OnceLock<Result<Arc<ParserFactory>, GrammarError>>,
    cache: Mutex<LruCache<Cached>>,
    compilations: AtomicU64,
}

/// A compiled constraint: the matcher every sequence under it starts from.
pub struct CompiledGrammar {
    start: Mutex<Matcher>,
    vocab_size: usize,
    step_timeout: Duration,
}

impl CompiledGrammar {
    /// A fresh matcher in the start state.
    pub fn matcher(&self) -> Matcher {
        self.start.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The vocabulary the masks cover (the logits row width).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The longest one mask computation or advance may take ([`GrammarLimits::step_timeout`]).
    pub fn step_timeout(&self) -> Duration {
        self.step_timeout
    }
}

impl std::fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGrammar").field("vocab_size", &self.vocab_size).finish()
    }
}

impl GrammarCompiler {
    /// A compiler for a model with this tokenizer and `vocab_size` logits per row.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, limits: GrammarLimits) -> GrammarCompiler {
        let cache = Mutex::new(LruCache::new(limits.cache_capacity));
        GrammarCompiler {
            tokenizer,
            vocab_size,
            limits,
            factory: OnceLock::new(),
            cache,
            compilations: AtomicU64::new(0),
        }
    }

    /// The compiled form of `constraint`, from the cache when it was seen before.
    pub fn compile(&self, constraint: &Constraint) -> Cached {
        let key = constraint.cache_key();
        if let Some(hit) = self.lock_cache().get(&key) {
            return hit;
        }
        let result = self.compile_uncached(constraint);
        self.lock_cache().insert(key, result.clone());
        result
    }

    /// How many constraints were compiled (cache misses), since the start.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LruCache<Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, GrammarError> {
        self.factory
            .get_or_init(|| {
                let env = LumenTokEnv::build(&self.tokenizer, self.vocab_size)?;
                let mut factory = ParserFactory::new_simple(&env)
                    .map_err(|e| GrammarError::Unavailable(format!("building the token trie: {e}")))?;
                factory.quiet();
                *factory.limits_mut() = self.limits.parser.clone();
                Ok(Arc::new(factory))
            })
            .clone()
    }

    fn compile_uncached(&self, constraint: &Constraint) -> Cached {
        self.compilations.fetch_add(1, Ordering::Relaxed);
        let factory = self.factory()?;
        let grammar = top_level_grammar(constraint)?;
        let mut parser = factory.create_parser(grammar).map_err(|e| invalid(constraint, &e.to_string()))?;
        // Every matcher cloned from this one gets its own handle (llguidance snapshots it).
        let handle = parser.enable_cancellation();
        let timeout = self.limits.compile_timeout;
        let deadline = Deadline::arm(Some(handle), timeout);
        let mut matcher = Matcher::new(Ok(parser));
        let first = matcher.compute_mask();
        let first = first.map_err(|e| {
            if matcher.is_cancelled() {
                GrammarError::Invalid(format!(
                    "computing its first token mask took longer than {} ms (does every rule finish?)",
                    timeout.as_millis()
                ))
            } else {
                invalid(constraint, &e.to_string())
            }
        })?;
        drop(deadline);
        if first.is_zero() && !matcher.is_accepting().unwrap_or(false) {
            return Err(GrammarError::Invalid("the constraint allows no output at all".into()));
        }
        let step_timeout = self.limits.step_timeout;
        Ok(Arc::new(CompiledGrammar { start: Mutex::new(matcher), vocab_size: self.vocab_size, step_timeout }))
    }
}

/// A compile error as the client reads it, with a hint where llguidance's message alone misleads.
fn invalid(constraint: &Constraint, message: &str) -> GrammarError {
    let hint = match &constraint.kind {
        ConstraintKind::Lark(text) if text.contains("::=") => {
            " (grammars use llguidance's Lark syntax, `name: expansion`; GBNF `::=` rules are not accepted)"
        }
        _ => "",
    };
    GrammarError::Invalid(format!("{message}{hint}"))
}

/// The llguidance grammar of a constraint.
fn top_level_grammar(constraint: &Constraint) -> Result<TopLevelGrammar, GrammarError> {
    Ok(match &constraint.kind {
        ConstraintKind::JsonSchema(text) => {
            let schema: Value = serde_json::from_str(text)
                .map_err(|e| GrammarError::Invalid(format!("the JSON schema is not valid JSON: {e}")))?;
            TopLevelGrammar::from_json_schema(with_json_options(schema, constraint))
        }
        ConstraintKind::JsonObject => {
            TopLevelGrammar::from_json_schema(with_json_options(json!({"type": "object"}), constraint))
        }
        ConstraintKind::Regex(rx) => TopLevelGrammar::from_regex(rx),
        ConstraintKind::Choice(choices) => {
            if choices.is_empty() {
                return Err(GrammarError::Invalid("the choice list is empty".into()));
            }
            let alternatives: Vec<String> = choices.iter().map(|c| Value::String(c.clone()).to_string()).collect();
            TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
        }
        ConstraintKind::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
    })
}

/// The schema with vLLM's JSON options applied: closed objects for `disable_additional_properties`,
/// and llguidance's whitespace settings under its `x-guidance` key.
fn with_json_options(mut schema: Value, constraint: &Constraint) -> Value {
    if constraint.disable_additional_properties {
        close_objects(&mut schema);
    }
    if let Value::Object(map) = &mut schema {
        let mut options = Map::new();
        if constraint.disable_any_whitespace {
            options.insert("whitespace_flexible".into(), Value::Bool(false));
        }
        if let Some(pattern) = &constraint.whitespace_pattern {
            options.insert("whitespace_pattern".into(), Value::String(pattern.clone()));
        }
        if !options.is_empty() {
            let entry = map.entry("x-guidance").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(existing) = entry {
                existing.extend(options);
            }
        }
    }
    schema
}

/// Sets `additionalProperties: false` on every (sub)schema that lists `properties` and says
/// nothing about additional ones (vLLM's `disable_additional_properties`).
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object) && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            // Values under these keys are data, not schemas.
            let data = ["enum", "const", "default", "examples"];
            for (_, value) in map.iter_mut().filter(|(k, _)| !data.contains(&k.as_str())) {
                close_objects(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}
