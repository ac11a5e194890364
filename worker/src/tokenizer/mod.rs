//! Tokenizers (from `tokenizer.json` or GGUF metadata), chat templates, incremental
//! detokenizing and stop-string matching.
//!
//! Contract of [`Tokenizer`]:
//! - Cheap to clone (shared `Arc`s) and `Send + Sync`; one instance serves every request.
//! - `encode(text, add_special_tokens)` never truncates or pads. Special/added tokens written in
//!   the text (`<|im_start|>`) are always matched whole, as llama.cpp's `parse_special` and
//!   `transformers` do, so a chat prompt and a raw prompt tokenize the same way. With
//!   `add_special_tokens`, BOS is prepended iff the tokenizer adds BOS (`add_bos_token` in
//!   tokenizer_config.json / GGUF, else whatever the tokenizer.json post-processor does) and the
//!   text does not already start with it; no other post-processing (e.g. an appended EOS) is done.
//! - `eos_token_ids()` are the ids that end generation: the configured EOS (GGUF: also EOT/EOM),
//!   plus whatever `add_eos_token_ids` adds (generation_config.json).
//! - `encode_chat` renders the template and encodes with `add_special_tokens = true`, so BOS
//!   appears exactly once whether or not the template writes it.

mod chat_template;
mod detokenizer;
mod gguf;
mod hf_config;
mod pyjson;
mod stop;
mod strftime;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_tools;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;

pub use chat_template::{ChatMessage, ChatTemplateOptions, TEMPLATE_FUEL};
pub use detokenizer::IncrementalDetokenizer;
pub use stop::{StopOutcome, StopStringMatcher};

use crate::TokenId;
use crate::error::{Result, WorkerError};
use chat_template::ChatTemplate;
use hf_config::TokenizerConfig;

/// Whether a chat template is available, and why not.
#[derive(Clone, Debug)]
enum TemplateState {
    Missing,
    /// The model ships a template that does not compile; kept so the error reaches the caller.
    Invalid(Arc<str>),
    Ready(Arc<ChatTemplate>),
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    special_ids: Arc<HashSet<TokenId>>,
    bos_token_id: Option<TokenId>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<TokenId>,
    add_bos: bool,
    template: TemplateState,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &matches!(self.template, TemplateState::Ready(_)))
            .finish()
    }
}

fn tokenizer_err(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Tokenizer(e.to_string())
}

/// What the constructors have found out, before the shared parts are built.
struct Parts {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<TokenId>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<TokenId>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, if given, `tokenizer_config.json` (chat template, BOS/EOS,
    /// `add_bos_token`). A missing or corrupt file gives an error naming it.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.is_file() {
            return Err(WorkerError::model_file(tokenizer_json, "no such file"));
        }
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| WorkerError::model_file(tokenizer_json, format!("cannot load tokenizer: {e}")))?;
        inner.with_truncation(None).map_err(|e| WorkerError::model_file(tokenizer_json, e.to_string()))?;
        inner.with_padding(None);
        let config = match tokenizer_config_json {
            Some(path) => TokenizerConfig::load(path)?,
            None => TokenizerConfig::default(),
        };
        let id_of = |token: &Option<String>, what: &str| {
            let token = token.as_deref()?;
            let id = inner.token_to_id(token);
            if id.is_none() {
                tracing::warn!(token, what, "tokenizer config names a token missing from the vocabulary");
            }
            id
        };
        let mut bos_token_id = id_of(&config.bos_token, "bos_token");
        let eos_token_ids: Vec<TokenId> = id_of(&config.eos_token, "eos_token").into_iter().collect();
        let post_processor_bos = post_processor_bos(&inner)?;
        bos_token_id = bos_token_id.or(post_processor_bos);
        let add_bos = config.add_bos_token.unwrap_or(post_processor_bos.is_some());
        let bos_token = config.bos_token.or_else(|| bos_token_id.and_then(|id| inner.id_to_token(id)));
        Ok(Self::assemble(Parts {
            inner,
            bos_token_id,
            bos_token,
            eos_token: config.eos_token,
            eos_token_ids,
            add_bos,
            chat_template: config.chat_template,
        }))
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata (see `gguf.rs` for
    /// what is supported).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let g = gguf::build(content)?;
        Ok(Self::assemble(Parts {
            inner: g.inner,
            bos_token_id: g.bos_token_id,
            bos_token: g.bos_token,
            eos_token: g.eos_token,
            eos_token_ids: g.eos_token_ids,
            add_bos: g.add_bos,
            chat_template: g.chat_template,
        }))
    }

    fn assemble(p: Parts) -> Self {
        let special_ids: HashSet<TokenId> = p
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let template = match p.chat_template {
            None => TemplateState::Missing,
            Some(src) => match ChatTemplate::new(src, p.bos_token.clone(), p.eos_token.clone()) {
                Ok(t) => TemplateState::Ready(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "the model's chat template does not compile");
                    TemplateState::Invalid(e.to_string().into())
                }
            },
        };
        Tokenizer {
            inner: Arc::new(p.inner),
            special_ids: Arc::new(special_ids),
            bos_token_id: p.bos_token_id,
            bos_token: p.bos_token,
            eos_token: p.eos_token,
            eos_token_ids: p.eos_token_ids,
            add_bos: p.add_bos,
            template,
        }
    }

    /// Replaces the chat template (e.g. from `--chat-template`); fails if it does not compile.
    pub fn with_chat_template(mut self, source: String) -> Result<Self> {
        let t = ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone())?;
        self.template = TemplateState::Ready(Arc::new(t));
        Ok(self)
    }

    /// Whether `apply_chat_template` can work.
    pub fn has_chat_template(&self) -> bool {
        matches!(self.template, TemplateState::Ready(_))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.bos_token_id
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos_token_id.is_some()
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[TokenId] {
        &self.eos_token_ids
    }

    /// Adds end-of-generation ids (from generation_config.json); duplicates are ignored.
    pub fn add_eos_token_ids(&mut self, ids: impl IntoIterator<Item = TokenId>) {
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
    }

    /// The id of a token given by its vocabulary text (e.g. `"<|eot_id|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` as stored (e.g. `Ġhello` in byte-level BPE), as
    /// `convert_ids_to_tokens` gives it; `None` for an unknown id.
    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Tokenizes `text`; see the module docs for what `add_special_tokens` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        let encoding = self.inner.encode_fast(text, false).map_err(tokenizer_err)?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens
            && self.add_bos
            && let Some(bos) = self.bos_token_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Decodes `ids` to text; ids outside the vocabulary are dropped, invalid UTF-8 is rendered
    /// as U+FFFD.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tokenizer_err)
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (the model part only: chat
    /// template and special-token settings live in `tokenizer_config.json`).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| WorkerError::model_file(path, format!("cannot write: {e}")))
    }

    /// The text of one token for display (logprobs); a token holding part of a UTF-8 character
    /// shows U+FFFD, an unknown id shows nothing.
    pub fn token_piece(&self, id: TokenId) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The underlying `tokenizers` object (the grammar module reads its vocabulary and decoder).
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Whether `id` is a special (control) token that `skip_special_tokens` drops.
    pub fn is_special(&self, id: TokenId) -> bool {
        self.special_ids.contains(&id)
    }

    /// Renders the conversation with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], opts: &ChatTemplateOptions) -> Result<String> {
        match &self.template {
            TemplateState::Ready(t) => t.render(messages, opts),
            TemplateState::Invalid(e) => {
                Err(WorkerError::ChatTemplate(format!("the model's chat template does not compile: {e}")))
            }
            TemplateState::Missing => Err(WorkerError::ChatTemplate(
                "the model has no chat template; use the completions API or pass a chat template".into(),
            )),
        }
    }

    /// Renders the conversation and tokenizes it with BOS exactly once.
    pub fn encode_chat(&self, messages: &[ChatMessage], opts: &ChatTemplateOptions) -> Result<Vec<TokenId>> {
        let text = self.apply_chat_template(messages, opts)?;
        self.encode(&text, true)
    }
}

/// The token the tokenizer.json post-processor puts in front of a sequence, if any.
fn post_processor_bos(inner: &tokenizers::Tokenizer) -> Result<Option<TokenId>> {
    let plain = inner.encode_fast("a", false).map_err(tokenizer_err)?;
    let with = inner.encode_fast("a", true).map_err(tokenizer_err)?;
    let (plain, with) = (plain.get_ids(), with.get_ids());
    Ok(match with.first() {
        Some(&first) if with.len() > plain.len() && plain.first() != Some(&first) => Some(first),
        _ => None,
    })
}
