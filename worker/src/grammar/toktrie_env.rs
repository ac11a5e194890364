//! The tokenizer as llguidance sees it: every token id's bytes in a [`TokTrie`], and tokenizing
//! bytes for the grammar's forced text.
//!
//! Contract of [`token_bytes`]:
//! - One entry per id of the model's vocabulary (`vocab_size`, the logits row width); ids the
//!   tokenizer lacks, and tokenizer ids at or beyond `vocab_size`, are empty (never allowed).
//! - Special added tokens are `0xFF` followed by their text (llguidance's special-token marker:
//!   no grammar matches them, only end-of-sequence is allowed, and only when the grammar
//!   accepts); non-special added tokens are their text.
//! - Vocabulary entries are decoded by the tokenizer's decoder kind: byte-level BPE (GPT-2's
//!   byte-to-character alphabet; GGUF `gpt2` tokenizers are built that way too) or
//!   SentencePiece-style byte fallback (`<0xAB>` pieces, `▁` for a space). Any other decoder is
//!   refused: a wrong byte table would let the mask allow invalid text.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use toktrie::{INVALID_TOKEN, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use super::GrammarError;
use crate::TokenId;
use crate::tokenizer::Tokenizer;

/// How vocabulary strings map to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoding {
    /// GPT-2's printable alphabet for the 256 byte values.
    ByteLevel,
    /// `<0xAB>` byte pieces, `space` standing for a space, the rest UTF-8 as is.
    ByteFallback { space: char },
}

/// llguidance's view of one model's tokenizer.
pub struct LumenTokEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl LumenTokEnv {
    /// Builds the trie over `vocab_size` ids, with the tokenizer's end-of-sequence ids.
    pub fn build(tokenizer: &Tokenizer, vocab_size: usize) -> Result<TokEnv, GrammarError> {
        let words = token_bytes(tokenizer, vocab_size)?;
        let eos: Vec<TokenId> =
            tokenizer.eos_token_ids().iter().copied().filter(|&t| (t as usize) < vocab_size).collect();
        let info = TokRxInfo {
            vocab_size: vocab_size as u32,
            tok_eos: eos.first().copied().unwrap_or(INVALID_TOKEN),
            tok_bos: tokenizer.bos_token_id().filter(|&t| (t as usize) < vocab_size),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(Arc::new(LumenTokEnv { trie, tokenizer: tokenizer.clone() }))
    }
}

impl TokenizerEnv for LumenTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text the grammar forces: the model's own tokenization where it is valid UTF-8.
        match std::str::from_utf8(s).ok().and_then(|text| self.tokenizer.encode(text, false).ok()) {
            Some(ids) if ids.iter().all(|&t| (t as usize) < self.trie.vocab_size()) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

/// The bytes of every id below `vocab_size` (see the module docs).
pub fn token_bytes(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>, GrammarError> {
    let hf = tokenizer.hf();
    let decoding = decoding(hf)?;
    let mut words = vec![Vec::new(); vocab_size];
    let byte_of = byte_level_table();
    for (text, id) in hf.get_vocab(false) {
        let Some(slot) = words.get_mut(id as usize) else { continue };
        *slot = match decoding {
            Decoding::ByteLevel => {
                text.chars().map(|c| byte_of.get(&c).copied()).collect::<Option<Vec<u8>>>().ok_or_else(|| {
                    GrammarError::Unavailable(format!("token {id} ({text:?}) is not in the byte-level alphabet"))
                })?
            }
            Decoding::ByteFallback { space } => {
                byte_piece(&text).unwrap_or_else(|| text.replace(space, " ").into_bytes())
            }
        };
    }
    for (id, added) in hf.get_added_tokens_decoder() {
        let Some(slot) = words.get_mut(id as usize) else { continue };
        let mut bytes = Vec::with_capacity(added.content.len() + 1);
        if added.special {
            bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        bytes.extend_from_slice(added.content.as_bytes());
        *slot = bytes;
    }
    Ok(words)
}

/// The decoder kind, read from the decoder's serialized form (the same JSON tokenizer.json holds).
fn decoding(hf: &tokenizers::Tokenizer) -> Result<Decoding, GrammarError> {
    let decoder = hf.get_decoder().map(serde_json::to_value).transpose().ok().flatten().unwrap_or(Value::Null);
    let kind = |d: &Value| d.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    match kind(&decoder).as_str() {
        "ByteLevel" => return Ok(Decoding::ByteLevel),
        "Sequence" => {
            let parts = decoder.get("decoders").and_then(Value::as_array).cloned().unwrap_or_default();
            if parts.iter().any(|d| kind(d) == "ByteLevel") {
                return Ok(Decoding::ByteLevel);
            }
            if parts.iter().any(|d| kind(d) == "ByteFallback") {
                let space = parts
                    .iter()
                    .filter(|d| kind(d) == "Replace" && d.get("content").and_then(Value::as_str) == Some(" "))
                    .find_map(|d| d["pattern"]["String"].as_str().and_then(single_char))
                    .unwrap_or('▁');
                return Ok(Decoding::ByteFallback { space });
            }
        }
        _ => {}
    }
    Err(GrammarError::Unavailable(format!(
        "the tokenizer's decoder ({decoder}) is neither byte-level nor byte-fallback"
    )))
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

/// `<0xAB>` as the byte 0xAB.
fn byte_piece(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok().map(|b| vec![b])).flatten()
}

/// GPT-2's byte-to-character alphabet, inverted: printable Latin-1 bytes stand for themselves,
/// the other 68 byte values for U+0100 onwards, in byte order.
fn byte_level_table() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{0}');
                next += 1;
                (c, b)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_table_covers_every_byte_once() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
    }

    #[test]
    fn byte_pieces_parse_only_their_own_shape() {
        assert_eq!(byte_piece("<0x0A>"), Some(vec![10]));
        assert_eq!(byte_piece("<0x0A"), None);
        assert_eq!(byte_piece("<0xZZ>"), None);
        assert_eq!(byte_piece("<0x0AB>"), None);
    }
}
