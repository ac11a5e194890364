//! Weights from a Hugging Face model directory in safetensors format: `model.safetensors`, or the
//! shards listed by `model.safetensors.index.json` (`weight_map`: tensor name -> shard file).
//!
//! Contract:
//! - Every file is opened and memory-mapped exactly once, when the source is opened; its header is
//!   parsed and validated then (offsets contiguous and consistent with dtype and shape, data ending
//!   exactly at the end of the file), so a truncated shard, a missing shard, a file that is not
//!   safetensors at all, or an index naming a tensor its shard lacks fails at open time with a
//!   [`WorkerError::ModelFile`] naming the file. Nothing in a user's file can make this panic.
//! - [`TensorSource::tensor`] is zero-copy: it hands out [`TensorBytes::Mapped`] ranges of the
//!   shared `Arc<Mmap>` (absolute byte ranges within the file). Only F32, F16, BF16, F8_E4M3
//!   (FP8 checkpoints' codes) and I32 (packed AWQ / GPTQ weights; see `model::quant`) tensors can
//!   be read; any other dtype is an error naming the tensor and its dtype, raised when that tensor
//!   is asked for (a file may carry unused tensors of other types).
//! - An absent `lm_head.weight` is not an error here: tied embeddings are the caller's business
//!   (`LlamaConfig::tie_word_embeddings`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::Metadata;
use serde::Deserialize;

use super::source::{RawTensor, TensorBytes, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Size of the little-endian u64 header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = 8;
/// The safetensors crate refuses headers above 100 MB; so do we, before allocating anything.
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Where one tensor lives: which mapped file, its dtype as stored, shape and absolute byte range.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// One memory-mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// Tensors of a Hugging Face model directory, memory-mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Entry>,
    sharded: bool,
}

/// The parts of `model.safetensors.index.json` we use.
#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir`: the index and its shards when `model.safetensors.index.json`
    /// exists, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(WorkerError::model_file(dir, "not a directory (expected a Hugging Face model directory)"));
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_file(&single);
        }
        Err(WorkerError::model_file(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory")))
    }

    /// Opens a sharded checkpoint from its index file; shards are resolved next to the index.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| WorkerError::model_file(index_path, format!("cannot read: {e}")))?;
        let index: IndexFile = serde_json::from_str(&text).map_err(|e| {
            WorkerError::model_file(
                index_path,
                format!("not a valid safetensors index (needs a `weight_map` object): {e}"),
            )
        })?;
        let dir = index_path.parent().map(Path::to_path_buf).unwrap_or_default();

        // Shard names in first-seen order, each tensor pointing at its shard's position.
        let mut shard_names: Vec<&str> = Vec::new();
        let mut wanted: Vec<(&str, usize)> = Vec::with_capacity(index.weight_map.len());
        for (tensor, shard) in &index.weight_map {
            check_shard_name(index_path, tensor, shard)?;
            let pos = match shard_names.iter().position(|s| s == shard) {
                Some(p) => p,
                None => {
                    shard_names.push(shard);
                    shard_names.len() - 1
                }
            };
            wanted.push((tensor, pos));
        }
        if shard_names.is_empty() {
            return Err(WorkerError::model_file(index_path, "weight_map is empty"));
        }
        for shard in &shard_names {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(WorkerError::model_file(
                    &path,
                    format!("shard listed in {} is missing (incomplete download?)", index_path.display()),
                ));
            }
        }

        let mut files = Vec::with_capacity(shard_names.len());
        let mut per_file = Vec::with_capacity(shard_names.len());
        for (i, shard) in shard_names.iter().enumerate() {
            let (file, entries) = map_file(&dir.join(shard), i)?;
            files.push(file);
            per_file.push(entries);
        }
        // Keep exactly what the index maps, each from the shard the index names.
        let mut tensors = HashMap::with_capacity(wanted.len());
        for (name, i) in wanted {
            let entry = per_file.get_mut(i).and_then(|entries| entries.remove(name)).ok_or_else(|| {
                WorkerError::model_file(
                    dir.join(shard_names[i]),
                    format!(
                        "{} maps tensor `{name}` to this shard, but the shard has no such tensor",
                        index_path.display()
                    ),
                )
            })?;
            tensors.insert(name.to_string(), entry);
        }
        Ok(SafetensorsSource { dir, files, tensors, sharded: true })
    }

    /// Opens a single-file checkpoint.
    pub fn open_file(path: &Path) -> Result<Self> {
        let (file, tensors) = map_file(path, 0)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(SafetensorsSource { dir, files: vec![file], tensors, sharded: false })
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Number of files mapped (1 for a single-file checkpoint).
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The file holding `name`, if present.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        let entry = self.tensors.get(name)?;
        self.files.get(entry.file).map(|f| f.path.as_path())
    }
}

impl TensorSource for SafetensorsSource {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| WorkerError::tensor(name, format!("not found in {}", self.describe())))?;
        let dtype = match entry.dtype {
            Dtype::F32 => TensorDType::F32,
            Dtype::F16 => TensorDType::F16,
            Dtype::BF16 => TensorDType::BF16,
            Dtype::F8_E4M3 => TensorDType::F8E4M3,
            Dtype::I32 => TensorDType::I32,
            other => {
                let file = self.files.get(entry.file).map(|f| f.path.display().to_string()).unwrap_or_default();
                return Err(WorkerError::tensor(
                    name,
                    format!("dtype {other:?} in {file} is not supported (supported: F32, F16, BF16, F8_E4M3, I32)"),
                ));
            }
        };
        let file =
            self.files.get(entry.file).ok_or_else(|| WorkerError::tensor(name, "internal: file index out of range"))?;
        Ok(RawTensor {
            name: name.to_string(),
            dtype,
            shape: entry.shape.clone(),
            bytes: TensorBytes::Mapped { map: Arc::clone(&file.map), range: entry.range.clone() },
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn describe(&self) -> String {
        if self.sharded {
            format!("{} ({} shards)", self.dir.display(), self.files.len())
        } else {
            self.files.first().map(|f| f.path.display().to_string()).unwrap_or_else(|| self.dir.display().to_string())
        }
    }
}

/// Maps one file and indexes its tensors; entries point at file number `file_idx`.
fn map_file(path: &Path, file_idx: usize) -> Result<(MappedFile, HashMap<String, Entry>)> {
    let (map, data_start, metadata) = map_and_parse(path)?;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let range = data_start + info.data_offsets.0..data_start + info.data_offsets.1;
            (name, Entry { file: file_idx, dtype: info.dtype, shape: info.shape.clone(), range })
        })
        .collect();
    Ok((MappedFile { path: path.to_path_buf(), map: Arc::new(map) }, entries))
}

/// Rejects shard names that would leave the model directory (absolute paths, `..`).
fn check_shard_name(index_path: &Path, tensor: &str, shard: &str) -> Result<()> {
    let p = Path::new(shard);
    let escapes = shard.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_)));
    if escapes {
        return Err(WorkerError::model_file(
            index_path,
            format!("tensor `{tensor}` maps to `{shard}`, which is not a file name inside the model directory"),
        ));
    }
    Ok(())
}

/// Maps `path` and validates its header; returns the map, where tensor data starts, and the
/// parsed header.
fn map_and_parse(path: &Path) -> Result<(Mmap, usize, Metadata)> {
    let file = File::open(path).map_err(|e| WorkerError::model_file(path, format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| WorkerError::model_file(path, format!("cannot stat: {e}")))?.len();
    let file_len = usize::try_from(file_len).map_err(|_| WorkerError::model_file(path, "file too large to map"))?;
    if file_len < HEADER_LEN_BYTES {
        return Err(WorkerError::model_file(path, format!("not a safetensors file: only {file_len} bytes")));
    }
    // SAFETY: the map is read-only. Like every mmap-based loader we rely on the file not being
    // truncated or rewritten while the worker runs; the header checks below bound every range we
    // hand out by the length the file had when mapped.
    let map =
        unsafe { Mmap::map(&file) }.map_err(|e| WorkerError::model_file(path, format!("cannot memory-map: {e}")))?;
    let (data_start, metadata) = parse_header(&map).map_err(|reason| WorkerError::model_file(path, reason))?;
    Ok((map, data_start, metadata))
}

/// Parses and validates a safetensors header in `bytes` (the whole file). On success returns the
/// offset of the data section and the metadata; on failure, a sentence saying what is wrong.
fn parse_header(bytes: &[u8]) -> std::result::Result<(usize, Metadata), String> {
    let not_st = |why: String| format!("not a safetensors file: {why}");
    let mut len_bytes = [0u8; HEADER_LEN_BYTES];
    len_bytes.copy_from_slice(bytes.get(..HEADER_LEN_BYTES).ok_or_else(|| not_st("shorter than 8 bytes".into()))?);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES as u64 {
        return Err(not_st(format!("header length field {header_len} is implausible")));
    }
    let header_len = header_len as usize;
    let data_start = HEADER_LEN_BYTES + header_len;
    let header = bytes.get(HEADER_LEN_BYTES..data_start).ok_or_else(|| {
        format!("truncated: header declares {header_len} bytes but the file holds only {}", bytes.len())
    })?;
    let metadata: Metadata =
        serde_json::from_slice(header).map_err(|e| not_st(format!("header is not valid safetensors JSON: {e}")))?;
    let data_len = metadata.data_len();
    let have = bytes.len() - data_start;
    if data_len > have {
        let last = metadata.offset_keys().pop().unwrap_or_default();
        return Err(format!(
            "truncated: tensor data ends at byte {} (tensor `{last}`) but the file is {} bytes long",
            data_start + data_len,
            bytes.len()
        ));
    }
    if data_len < have {
        return Err(format!(
            "{} unexpected bytes after the last tensor (data section is {data_len} bytes, file holds {have})",
            have - data_len
        ));
    }
    Ok((data_start, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    #[test]
    fn header_parse_reports_data_start_and_ranges() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}}"#;
        let bytes = file_with_header(h, 14);
        let (start, meta) = parse_header(&bytes).unwrap();
        assert_eq!(start, 8 + h.len());
        assert_eq!(meta.info("b").map(|i| i.data_offsets), Some((8, 14)));
    }

    #[test]
    fn header_parse_rejects_truncated_data_naming_the_last_tensor() {
        let h = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let err = parse_header(&file_with_header(h, 10)).unwrap_err();
        assert!(err.contains("truncated") && err.contains("`w`"), "{err}");
    }

    #[test]
    fn header_parse_rejects_garbage_and_absurd_lengths() {
        let err = parse_header(b"GGUF\x03\x00\x00\x00rest-of-a-gguf-file").unwrap_err();
        assert!(err.contains("not a safetensors file"), "{err}");
        let mut json_but_wrong = file_with_header(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#, 8);
        assert!(parse_header(&json_but_wrong).unwrap_err().contains("not a safetensors file"));
        json_but_wrong.truncate(20);
        assert!(parse_header(&json_but_wrong).unwrap_err().contains("truncated"));
    }

    #[test]
    fn shard_names_may_not_escape_the_directory() {
        let idx = Path::new("/m/model.safetensors.index.json");
        assert!(check_shard_name(idx, "t", "model-00001-of-00002.safetensors").is_ok());
        assert!(check_shard_name(idx, "t", "../secret.safetensors").is_err());
        assert!(check_shard_name(idx, "t", "/etc/passwd").is_err());
        assert!(check_shard_name(idx, "t", "").is_err());
    }
}
