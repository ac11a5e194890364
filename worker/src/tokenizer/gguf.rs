//! Building a `tokenizers::Tokenizer` from GGUF metadata, the way llama.cpp reads it.
//!
//! Contract:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE. Vocabulary = `tokenizer.ggml.tokens` (index
//!   = id), merges = `tokenizer.ggml.merges` ("left right", rank = index). The pre-tokenizer is the
//!   sequence of regex splits llama.cpp uses for `tokenizer.ggml.pre` (see [`pre_tokenizer_regexes`];
//!   unknown names fall back to GPT-2's with a warning), followed by the byte-to-unicode mapping.
//!   `llama-bpe` also sets `ignore_merges` (a whole word found in the vocabulary is one token) and
//!   defaults `add_bos` to true, as llama.cpp does.
//! - Tokens typed CONTROL (3) are special added tokens (matched whole in text, dropped by
//!   `skip_special_tokens`); USER_DEFINED (4) are non-special added tokens (matched whole, kept).
//! - `tokenizer.ggml.model = "llama"` (SentencePiece) and others are not supported yet.
//! - End-of-generation ids are `eos_token_id`, `eot_token_id` and `eom_token_id`, deduplicated.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::TokenId;
use crate::error::{Result, WorkerError};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What `Tokenizer::from_gguf` needs besides the `tokenizers` object.
pub(crate) struct GgufTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<TokenId>,
    pub eos_token_ids: Vec<TokenId>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Text of BOS / EOS, for the template's `bos_token` / `eos_token`.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's letter class: Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee and other
/// cased scripts, spelled out as ranges in its tokenizer.json. Code points with a canonical
/// singleton decomposition (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A) are escaped so that
/// an editor's Unicode normalisation cannot silently change the class.
const DEEPSEEK_LETTERS: &str = "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";

/// The split regexes, applied in order, for a `tokenizer.ggml.pre` name; `None` if unknown.
pub(crate) fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => vec![GPT2],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => vec![LLAMA3],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => vec![QWEN2],
        "deepseek-llm" => {
            vec!["[\r\n]", DEEPSEEK_LETTERS, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", "[一-龥ࠀ-一가-퟿]+", "\\p{N}+"]
        }
        _ => return None,
    })
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let regexes = pre_tokenizer_regexes(pre).unwrap_or_else(|| {
        tracing::warn!(pre, "unknown GGUF pre-tokenizer; falling back to GPT-2's regex");
        vec![GPT2]
    });
    let mut steps = Vec::with_capacity(regexes.len() + 1);
    for regex in regexes {
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| WorkerError::Tokenizer(format!("pre-tokenizer `{pre}` regex: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    // The regexes already split the text; ByteLevel only maps bytes to its printable alphabet.
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_str(content: &Content, key: &str) -> Result<Option<String>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_type(key, "a string", other)),
    }
}

fn bad_type(key: &str, want: &str, got: &Value) -> WorkerError {
    WorkerError::Tokenizer(format!("GGUF key `{key}` should be {want}, found {:?}", got.value_type()))
}

/// Any integer-typed GGUF value as i64.
fn as_int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn meta_token_id(content: &Content, key: &str, vocab_len: usize) -> Result<Option<TokenId>> {
    let Some(v) = meta(content, key) else {
        return Ok(None);
    };
    let id = as_int(v).ok_or_else(|| bad_type(key, "an integer", v))?;
    match TokenId::try_from(id) {
        Ok(id) if (id as usize) < vocab_len => Ok(Some(id)),
        _ => {
            tracing::warn!(key, id, vocab_len, "GGUF special token id out of range; ignored");
            Ok(None)
        }
    }
}

fn meta_array<'a>(content: &'a Content, key: &str) -> Result<Option<&'a Vec<Value>>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(bad_type(key, "an array", other)),
    }
}

fn string_array<'a>(content: &'a Content, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = meta_array(content, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(bad_type(key, "an array of strings", other)),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Splits a GGUF merge "left right" at the first space after the first character.
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let pos = merge[first_len..].find(' ')? + first_len;
    Some((merge[..pos].to_string(), merge[pos + 1..].to_string()))
}

pub(crate) fn build(content: &Content) -> Result<GgufTokenizer> {
    let model = meta_str(content, "tokenizer.ggml.model")?
        .ok_or_else(|| WorkerError::Tokenizer("GGUF has no `tokenizer.ggml.model`".into()))?;
    if model != "gpt2" {
        return Err(WorkerError::Tokenizer(format!(
            "GGUF tokenizer model `{model}` is not supported (only `gpt2` byte-level BPE is); \
             pass a tokenizer.json instead"
        )));
    }
    let pre = meta_str(content, "tokenizer.ggml.pre")?.unwrap_or_else(|| "default".to_string());
    let tokens = string_array(content, "tokenizer.ggml.tokens")?
        .ok_or_else(|| WorkerError::Tokenizer("GGUF has no `tokenizer.ggml.tokens`".into()))?;
    let merges = string_array(content, "tokenizer.ggml.merges")?
        .ok_or_else(|| WorkerError::Tokenizer("GGUF BPE tokenizer has no `tokenizer.ggml.merges`".into()))?;
    let token_types: Vec<i64> = match meta_array(content, "tokenizer.ggml.token_type")? {
        Some(types) => types
            .iter()
            .map(|v| as_int(v).ok_or_else(|| bad_type("tokenizer.ggml.token_type", "an integer array", v)))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };

    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id = TokenId::try_from(id).map_err(|_| WorkerError::Tokenizer("vocabulary too large".into()))?;
        if vocab.insert((*token).to_string(), id).is_some() {
            tracing::warn!(token, id, "duplicate token in GGUF vocabulary; the later id wins");
        }
    }
    let merges = merges
        .iter()
        .map(|m| split_merge(m).ok_or_else(|| WorkerError::Tokenizer(format!("malformed GGUF merge {m:?}"))))
        .collect::<Result<Vec<_>>>()?;
    let is_llama3 = pre_tokenizer_regexes(&pre).is_some_and(|r| r == [LLAMA3]);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(is_llama3)
        .build()
        .map_err(|e| WorkerError::Tokenizer(format!("building BPE from GGUF: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    let (mut special, mut user_defined) = (Vec::new(), Vec::new());
    for (token, ty) in tokens.iter().zip(token_types.iter()) {
        match *ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(*token, true)),
            TOKEN_TYPE_USER_DEFINED => user_defined.push(AddedToken::from(*token, false).normalized(false)),
            _ => {}
        }
    }
    inner
        .add_special_tokens(special)
        .and_then(|_| inner.add_tokens(user_defined))
        .map_err(|e| WorkerError::Tokenizer(format!("adding GGUF special tokens: {e}")))?;

    let n = tokens.len();
    let bos_token_id = meta_token_id(content, "tokenizer.ggml.bos_token_id", n)?;
    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta_token_id(content, key, n)?
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    let add_bos = match meta(content, "tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(bad_type("tokenizer.ggml.add_bos_token", "a bool", other)),
        None => is_llama3,
    };
    let text_of = |id: Option<TokenId>| id.and_then(|id| tokens.get(id as usize)).map(|t| t.to_string());
    Ok(GgufTokenizer {
        bos_token: text_of(bos_token_id),
        eos_token: text_of(meta_token_id(content, "tokenizer.ggml.eos_token_id", n)?),
        inner,
        bos_token_id,
        eos_token_ids,
        add_bos,
        chat_template: meta_str(content, "tokenizer.chat_template")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_space_after_the_first_character() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("ab cd"), Some(("ab".into(), "cd".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("nospace"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn every_known_pre_tokenizer_compiles() {
        for pre in ["default", "llama-bpe", "smollm", "qwen2", "deepseek-r1-qwen", "deepseek-llm", "nonsense"] {
            pre_tokenizer(pre).unwrap_or_else(|e| panic!("{pre}: {e}"));
        }
    }
}
