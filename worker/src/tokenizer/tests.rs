//! Tests against the real model files in `models/` (fetched by scripts/fetch-model.sh): the
//! SmolLM2 GGUF tokenizer and the Llama-3.1 tokenizer.json, their chat templates, and the
//! incremental detokenizer on a byte-level vocabulary.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;

use super::*;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

pub(crate) fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-model.sh)", path.display()));
        let content = gguf_file::Content::read(&mut file).expect("GGUF header");
        Tokenizer::from_gguf(&content).expect("SmolLM2 tokenizer")
    })
}

pub(crate) fn llama3() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = models_dir().join("llama3.1-tokenizer");
        Tokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))
            .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model.sh)"))
    })
}

/// Text that exercises digits, indentation, punctuation, CJK, emoji and combining marks.
const VARIED: &[&str] = &[
    "Hello, world!",
    "The year 2024 had 366 days; 12345 is not 1234.5",
    "def f(x):\n    if x:\n        return [x * 2 for _ in range(3)]\n\treturn None\n",
    "  leading and trailing spaces   ",
    "日本語のテキストと中文混合",
    "emoji: 🦀🚀 family 👨‍👩‍👧 flag 🇫🇷 é vs e\u{301}",
    "don't won't I'M WE'LL you're",
    "\n\n\r\n tabs\t\tand\u{a0}nbsp",
    "",
];

#[test]
fn tokenizer_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone>() {}
    assert_traits::<Tokenizer>();
    assert_traits::<IncrementalDetokenizer>();
}

#[test]
fn smollm2_gguf_metadata_is_read() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert!(!tok.adds_bos());
    assert!(tok.has_chat_template());
}

#[test]
fn smollm2_round_trips_varied_text() {
    let tok = smollm2();
    for text in VARIED {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), *text, "ids {ids:?}");
    }
}

#[test]
fn smollm2_splits_numbers_into_single_digits() {
    let tok = smollm2();
    let ids = tok.encode("12345", false).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    let pieces: Vec<String> = ids.iter().map(|&id| tok.token_piece(id)).collect();
    assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
}

#[test]
fn smollm2_control_tokens_are_single_special_ids() {
    let tok = smollm2();
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.iter().filter(|&&id| id == 1 || id == 2).count(), 2);
    assert!(tok.is_special(1) && tok.is_special(2));
    assert!(!tok.is_special(ids[1]));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nHi<|im_end|>");
}

#[test]
fn smollm2_never_adds_bos() {
    let tok = smollm2();
    assert_eq!(tok.encode("Hi", true).unwrap(), tok.encode("Hi", false).unwrap());
}

#[test]
fn smollm2_template_renders_chatml_with_default_system_prompt() {
    let tok = smollm2();
    let messages = [ChatMessage::new("user", "Hi")];
    let opts = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    assert_eq!(
        tok.apply_chat_template(&messages, &opts).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    assert_eq!(
        tok.apply_chat_template(&messages, &ChatTemplateOptions::default()).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn llama3_encodes_known_ids() {
    let tok = llama3();
    assert_eq!(tok.encode("Hello, world!", false).unwrap(), [9906, 11, 1917, 0]);
    assert_eq!(tok.encode("Hello, world!", true).unwrap(), [128000, 9906, 11, 1917, 0]);
    assert_eq!(tok.encode(" 12345", false).unwrap().len(), 3, "digits group in threes");
    assert_eq!(tok.bos_token_id(), Some(128000));
    assert_eq!(tok.eos_token_ids(), &[128009]);
    assert_eq!(tok.vocab_size(), 128256);
}

#[test]
fn llama3_text_starting_with_bos_gets_no_second_bos() {
    let tok = llama3();
    let ids = tok.encode("<|begin_of_text|>Hi", true).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 128000).count(), 1, "{ids:?}");
    assert_eq!(ids[0], 128000);
}

#[test]
fn llama3_round_trips_and_skips_special_tokens() {
    let tok = llama3();
    for text in VARIED {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), *text);
    }
    assert!(tok.is_special(128000) && tok.is_special(128009));
    assert!(!tok.is_special(9906));
}

#[test]
fn llama3_template_renders_system_and_user_with_generation_prompt() {
    let tok = llama3();
    let messages = [ChatMessage::new("system", "You are helpful."), ChatMessage::new("user", "  Hi there  ")];
    let opts = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let text = tok.apply_chat_template(&messages, &opts).unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let ids = tok.encode_chat(&messages, &opts).unwrap();
    assert_eq!(ids[0], 128000);
    assert_eq!(ids.iter().filter(|&&id| id == 128000).count(), 1);
    assert_eq!(&ids[1..4], &[128006, 9125, 128007], "<|start_header_id|>system<|end_header_id|>");
}

#[test]
fn add_eos_token_ids_extends_without_duplicates() {
    let mut tok = llama3().clone();
    tok.add_eos_token_ids([128001, 128008, 128009]);
    assert_eq!(tok.eos_token_ids(), &[128009, 128001, 128008]);
    assert_eq!(llama3().eos_token_ids(), &[128009], "clones do not share EOS lists");
}

#[test]
fn missing_tokenizer_file_error_names_it() {
    let err = Tokenizer::from_files(&models_dir().join("nope/tokenizer.json"), None).unwrap_err();
    assert!(err.to_string().contains("nope/tokenizer.json"), "{err}");
    let dir = models_dir().join("llama3.1-tokenizer");
    let err = Tokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("missing_config.json"))).unwrap_err();
    assert!(err.to_string().contains("missing_config.json"), "{err}");
}

#[test]
fn model_without_template_gets_a_clear_error() {
    let dir = models_dir().join("llama3.1-tokenizer");
    let tok = Tokenizer::from_files(&dir.join("tokenizer.json"), None).unwrap();
    assert!(!tok.has_chat_template());
    assert_eq!(tok.bos_token_id(), Some(128000), "BOS found from the post-processor");
    assert!(tok.adds_bos());
    let err = tok.apply_chat_template(&[ChatMessage::new("user", "x")], &Default::default()).unwrap_err();
    assert!(matches!(err, WorkerError::ChatTemplate(ref m) if m.contains("no chat template")));
    let tok = tok.with_chat_template("{{ messages[0].content }}".into()).unwrap();
    assert_eq!(tok.encode_chat(&[ChatMessage::new("user", "Hi")], &Default::default()).unwrap(), [128000, 13347]);
}

#[test]
fn sentencepiece_gguf_is_reported_unsupported() {
    let mut content = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: Default::default(),
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    };
    content.metadata.insert("tokenizer.ggml.model".into(), gguf_file::Value::String("llama".into()));
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(matches!(err, WorkerError::Tokenizer(ref m) if m.contains("`llama` is not supported")), "{err}");
}

fn stream(tok: &Tokenizer, ids: &[TokenId], skip_special: bool) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(skip_special);
    let mut out: Vec<String> = ids.iter().map(|&id| detok.push(tok, id).unwrap()).collect();
    out.push(detok.finish(tok).unwrap());
    out
}

#[test]
fn detokenizer_output_equals_one_shot_decode_without_split_characters() {
    for tok in [smollm2(), llama3()] {
        let text = VARIED.concat();
        let ids = tok.encode(&text, false).unwrap();
        let deltas = stream(tok, &ids, false);
        assert_eq!(deltas.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(deltas.concat(), text);
        for d in &deltas {
            assert!(!d.ends_with('\u{FFFD}'), "delta {d:?} ends in a replacement character");
        }
    }
}

#[test]
fn emoji_spanning_several_tokens_is_emitted_whole() {
    let tok = smollm2();
    let ids = tok.encode("🦀", false).unwrap();
    assert!(ids.len() > 1, "the crab should need several byte tokens, got {ids:?}");
    assert!(tok.token_piece(ids[0]).contains('\u{FFFD}'), "a partial token renders lossily");
    let deltas = stream(tok, &ids, false);
    assert!(deltas[..ids.len() - 1].iter().all(String::is_empty), "{deltas:?}");
    assert_eq!(deltas[ids.len() - 1], "🦀");
}

#[test]
fn detokenizer_skips_special_tokens_when_asked() {
    let tok = smollm2();
    let ids = tok.encode("Hi there<|im_end|>\n<|im_start|>x", false).unwrap();
    assert_eq!(stream(tok, &ids, true).concat(), "Hi there\nx");
    assert_eq!(stream(tok, &ids, false).concat(), "Hi there<|im_end|>\n<|im_start|>x");
}

#[test]
fn detokenizer_with_prompt_keeps_the_leading_space() {
    let tok = llama3();
    let prompt = tok.encode("Say", true).unwrap();
    let ids = tok.encode(" hello world", false).unwrap();
    let mut detok = IncrementalDetokenizer::with_prompt(&prompt, true);
    let out: String = ids.iter().map(|&id| detok.push(tok, id).unwrap()).collect();
    assert_eq!(out + &detok.finish(tok).unwrap(), " hello world");
}

#[test]
fn detokenizer_window_stays_bounded_on_long_streams() {
    let tok = smollm2();
    let text = "Streaming 🦀 text, ".repeat(200);
    let ids = tok.encode(&text, false).unwrap();
    let mut detok = IncrementalDetokenizer::new(false);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&detok.push(tok, id).unwrap());
        assert!(detok.window_len() <= 64 + 8, "window grew to {}", detok.window_len());
    }
    out.push_str(&detok.finish(tok).unwrap());
    assert_eq!(out, text);
}

#[test]
fn garbage_bytes_do_not_stall_the_stream() {
    let tok = smollm2();
    // A lone UTF-8 lead byte repeated: never completes a character.
    let lead = tok.encode("🦀", false).unwrap()[0];
    let mut detok = IncrementalDetokenizer::new(false);
    let emitted: String = (0..20).map(|_| detok.push(tok, lead).unwrap()).collect();
    assert!(!emitted.is_empty(), "held text must be released after MAX_HELD_TOKENS");
}

/// Ids llama.cpp produced for the same GGUF (scripts/reference/tokenization_reference.py).
#[test]
fn smollm2_matches_llama_cpp_tokenization() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_tokenization.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10);
    let tok = smollm2();
    let mut mismatches = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<TokenId> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, false).unwrap();
        if got != want {
            mismatches.push(format!("{text:?}\n  llama.cpp {want:?}\n  lumen     {got:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// The `llama-bpe` GGUF path (regex, ignore_merges, control tokens) rebuilt from the Llama-3.1
/// tokenizer.json's own vocabulary must tokenize exactly like the tokenizer.json does.
#[test]
fn llama_bpe_gguf_path_matches_llama3_tokenizer_json() {
    use gguf_file::Value as V;
    let reference = llama3();
    let json_path = models_dir().join("llama3.1-tokenizer/tokenizer.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    let vocab = reference.inner.get_vocab(true);
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id as usize] = token;
    }
    let types: Vec<V> =
        (0..tokens.len() as u32).map(|id| V::I32(if reference.is_special(id) { 3 } else { 1 })).collect();
    let merges: Vec<V> = doc["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| V::String(m.as_str().expect("string merges").to_string()))
        .collect();
    let mut content = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: Default::default(),
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    };
    let meta = &mut content.metadata;
    meta.insert("tokenizer.ggml.model".into(), V::String("gpt2".into()));
    meta.insert("tokenizer.ggml.pre".into(), V::String("llama-bpe".into()));
    meta.insert("tokenizer.ggml.tokens".into(), V::Array(tokens.into_iter().map(V::String).collect()));
    meta.insert("tokenizer.ggml.token_type".into(), V::Array(types));
    meta.insert("tokenizer.ggml.merges".into(), V::Array(merges));
    meta.insert("tokenizer.ggml.bos_token_id".into(), V::U32(128000));
    meta.insert("tokenizer.ggml.eos_token_id".into(), V::U32(128009));
    let tok = Tokenizer::from_gguf(&content).unwrap();
    assert!(tok.adds_bos(), "llama-bpe defaults add_bos to true");
    let mut texts: Vec<String> = VARIED.iter().map(|s| s.to_string()).collect();
    texts.push("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHI 1234567 it's<|eot_id|>".into());
    for text in &texts {
        assert_eq!(tok.encode(text, true).unwrap(), reference.encode(text, true).unwrap(), "{text:?}");
    }
}
