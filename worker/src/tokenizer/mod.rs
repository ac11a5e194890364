//! Tokenizers (from `tokenizer.json` or GGUF metadata), chat templates, incremental
//! detokenizing and stop-string matching.
