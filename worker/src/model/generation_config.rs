//! A model's `generation_config.json`: extra end-of-sequence ids and the sampling defaults its
//! authors recommend (vLLM applies these when a request leaves them unset).
//!
//! Every field is optional: a key that is absent or `null` stays `None`, and a missing file is
//! not an error ([`GenerationConfig::from_dir`] returns `Ok(None)`). Keys we do not use are
//! ignored. `eos_token_id` may be one number or a list, as in `config.json`.

use std::path::Path;

use serde::Deserialize;

use super::config::IdOrIds;
use crate::{Result, TokenId, WorkerError};

/// The file name inside a Hugging Face model directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Values read from `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<TokenId>,
    /// End-of-sequence ids (empty when the file names none).
    pub eos_token_ids: Vec<TokenId>,
    pub pad_token_id: Option<TokenId>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// The default output length the authors suggest (`max_new_tokens`).
    pub max_new_tokens: Option<u32>,
    /// Hugging Face's switch between greedy and sampling; informational (vLLM ignores it too).
    pub do_sample: Option<bool>,
}

#[derive(Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<IdOrIds>,
    pad_token_id: Option<TokenId>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    max_new_tokens: Option<u32>,
    do_sample: Option<bool>,
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawGenerationConfig = serde_json::from_str(text)
            .map_err(|e| WorkerError::ModelConfig(format!("invalid {GENERATION_CONFIG_FILE}: {e}")))?;
        Ok(GenerationConfig {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(IdOrIds::into_vec).unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty,
            max_new_tokens: raw.max_new_tokens,
            do_sample: raw.do_sample,
        })
    }

    /// Reads a `generation_config.json` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| WorkerError::model_file(path, format!("cannot read: {e}")))?;
        Self::from_json(&text).map_err(|e| match e {
            WorkerError::ModelConfig(reason) => WorkerError::model_file(path, reason),
            other => other,
        })
    }

    /// Reads `dir/generation_config.json` when it exists; `Ok(None)` when it does not.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        Self::from_file(&path).map(Some)
    }

    /// `config.json`'s eos ids followed by this file's, without duplicates, in first-seen order.
    pub fn merged_eos_ids(&self, from_config: &[TokenId]) -> Vec<TokenId> {
        let mut ids: Vec<TokenId> = Vec::with_capacity(from_config.len() + self.eos_token_ids.len());
        for &id in from_config.iter().chain(&self.eos_token_ids) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama31_style_file_with_eos_list_and_sampling_defaults() {
        let text = r#"{"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009],
                       "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.42.3"}"#;
        let g = GenerationConfig::from_json(text).unwrap();
        assert_eq!(g.bos_token_id, Some(128000));
        assert_eq!(g.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!((g.temperature, g.top_p, g.top_k), (Some(0.6), Some(0.9), None));
        assert_eq!(g.do_sample, Some(true));
    }

    #[test]
    fn single_eos_number_nulls_and_integer_floats_are_accepted() {
        let g = GenerationConfig::from_json(
            r#"{"eos_token_id": 2, "temperature": 1, "top_k": 50, "repetition_penalty": 1.1, "pad_token_id": null}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![2]);
        assert_eq!(g.temperature, Some(1.0));
        assert_eq!(g.top_k, Some(50));
        assert_eq!(g.repetition_penalty, Some(1.1));
        assert_eq!(g.pad_token_id, None);
    }

    #[test]
    fn malformed_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GENERATION_CONFIG_FILE);
        std::fs::write(&path, r#"{"temperature": "hot"}"#).unwrap();
        let err = GenerationConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("generation_config.json") && err.contains("\"hot\""), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap(), None);
    }

    #[test]
    fn merged_eos_ids_keep_config_order_and_drop_duplicates() {
        let g = GenerationConfig { eos_token_ids: vec![128009, 128001], ..Default::default() };
        assert_eq!(g.merged_eos_ids(&[128001]), vec![128001, 128009]);
    }
}
