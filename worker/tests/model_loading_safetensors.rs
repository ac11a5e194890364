//! SafetensorsSource against real files written with the `safetensors` crate: single file and
//! sharded checkpoints in f32/f16/bf16, and the broken checkpoints users actually produce
//! (truncated downloads, missing shards, stale indexes, wrong files).

use std::path::Path;

use half::{bf16, f16};
use lumen_worker::WorkerError;
use lumen_worker::model::dummy::llama_tensor_shapes;
use lumen_worker::model::{DummySource, LlamaConfig, SafetensorsSource, TensorBytes, TensorDType, TensorSource};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// One tensor to write: name, dtype, shape, little-endian bytes.
type Spec = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
}
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
}

fn write_file(path: &Path, specs: &[Spec]) {
    let views: Vec<(String, TensorView<'_>)> = specs
        .iter()
        .map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let weight_map: serde_json::Map<String, serde_json::Value> =
        map.iter().map(|(t, f)| (t.to_string(), serde_json::Value::String(f.to_string()))).collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn three_dtypes() -> Vec<Spec> {
    vec![
        ("a.f32".into(), Dtype::F32, vec![2, 3], f32_bytes(&[1.0, -2.0, 3.5, 0.0, 1e-3, -7.25])),
        ("b.f16".into(), Dtype::F16, vec![4], f16_bytes(&[0.5, -1.5, 2.0, 65504.0])),
        ("c.bf16".into(), Dtype::BF16, vec![2, 2], bf16_bytes(&[1.0, -0.25, 3.0, 256.0])),
    ]
}

fn message(e: WorkerError) -> String {
    e.to_string()
}

#[test]
fn single_file_f32_f16_bf16_read_back_zero_copy() {
    let tmp = tempfile::tempdir().unwrap();
    write_file(&tmp.path().join("model.safetensors"), &three_dtypes());
    let src = SafetensorsSource::open(tmp.path()).unwrap();
    assert_eq!(src.file_count(), 1);
    assert!(src.describe().ends_with("model.safetensors"), "{}", src.describe());
    assert_eq!(src.tensor_names(), vec!["a.f32", "b.f16", "c.bf16"]);

    let a = src.tensor("a.f32").unwrap();
    assert_eq!((a.dtype, a.shape.clone()), (TensorDType::F32, vec![2, 3]));
    assert_eq!(a.to_f32().unwrap(), vec![1.0, -2.0, 3.5, 0.0, 1e-3, -7.25]);
    assert!(matches!(a.bytes, TensorBytes::Mapped { .. }), "tensors must be mapped, not copied");

    let b = src.tensor("b.f16").unwrap();
    assert_eq!(b.dtype, TensorDType::F16);
    assert_eq!(b.to_f32().unwrap(), vec![0.5, -1.5, 2.0, 65504.0]);

    let c = src.tensor("c.bf16").unwrap();
    assert_eq!((c.dtype, c.shape.clone()), (TensorDType::BF16, vec![2, 2]));
    assert_eq!(c.to_f32().unwrap(), vec![1.0, -0.25, 3.0, 256.0]);

    assert!(src.contains("a.f32") && !src.contains("lm_head.weight"));
    let err = message(src.tensor("lm_head.weight").unwrap_err());
    assert!(err.contains("lm_head.weight") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn two_shards_with_index_read_back_from_the_right_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let mut specs = three_dtypes();
    let third = specs.pop().unwrap();
    write_file(&tmp.path().join("model-00001-of-00002.safetensors"), &specs);
    write_file(&tmp.path().join("model-00002-of-00002.safetensors"), &[third]);
    write_index(
        tmp.path(),
        &[
            ("a.f32", "model-00001-of-00002.safetensors"),
            ("b.f16", "model-00001-of-00002.safetensors"),
            ("c.bf16", "model-00002-of-00002.safetensors"),
        ],
    );
    // The index wins over a stray single file.
    write_file(&tmp.path().join("model.safetensors"), &[("stray".into(), Dtype::F32, vec![1], f32_bytes(&[9.0]))]);

    let src = SafetensorsSource::open(tmp.path()).unwrap();
    assert_eq!(src.file_count(), 2);
    assert!(src.describe().ends_with("(2 shards)"), "{}", src.describe());
    assert!(!src.contains("stray"));
    assert!(src.file_of("c.bf16").unwrap().ends_with("model-00002-of-00002.safetensors"));
    assert_eq!(src.tensor("c.bf16").unwrap().to_f32().unwrap(), vec![1.0, -0.25, 3.0, 256.0]);
    assert_eq!(src.tensor("b.f16").unwrap().to_f32().unwrap(), vec![0.5, -1.5, 2.0, 65504.0]);
    assert_eq!(src.tensor("a.f32").unwrap().to_f32().unwrap()[2], 3.5);
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    write_file(&path, &three_dtypes());
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn truncated_shard_is_an_error_naming_that_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = three_dtypes();
    write_file(&tmp.path().join("s1.safetensors"), &specs[..1]);
    write_file(&tmp.path().join("s2.safetensors"), &specs[1..]);
    write_index(tmp.path(), &[("a.f32", "s1.safetensors"), ("b.f16", "s2.safetensors"), ("c.bf16", "s2.safetensors")]);
    let s2 = tmp.path().join("s2.safetensors");
    // Cut inside the header: a download that stopped almost at once.
    std::fs::OpenOptions::new().write(true).open(&s2).unwrap().set_len(20).unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("s2.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn missing_shard_is_an_error_naming_the_shard_and_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = three_dtypes();
    write_file(&tmp.path().join("model-00001-of-00002.safetensors"), &specs[..2]);
    write_index(
        tmp.path(),
        &[
            ("a.f32", "model-00001-of-00002.safetensors"),
            ("b.f16", "model-00001-of-00002.safetensors"),
            ("c.bf16", "model-00002-of-00002.safetensors"),
        ],
    );
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    assert!(err.contains("model.safetensors.index.json"), "{err}");
}

#[test]
fn index_naming_a_tensor_absent_from_its_shard_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = three_dtypes();
    write_file(&tmp.path().join("s1.safetensors"), &specs[..1]);
    write_file(&tmp.path().join("s2.safetensors"), &specs[1..]);
    // c.bf16 really lives in s2; the index says s1.
    write_index(tmp.path(), &[("a.f32", "s1.safetensors"), ("b.f16", "s2.safetensors"), ("c.bf16", "s1.safetensors")]);
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("s1.safetensors") && err.contains("`c.bf16`"), "{err}");
}

#[test]
fn non_safetensors_files_and_empty_dirs_are_errors_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("no model.safetensors"), "{err}");

    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
    )
    .unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("not a safetensors file"), "{err}");

    std::fs::write(tmp.path().join("model.safetensors"), b"").unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("not a safetensors file"), "{err}");

    std::fs::write(tmp.path().join("model.safetensors.index.json"), b"{\"metadata\": {}}").unwrap();
    let err = message(SafetensorsSource::open(tmp.path()).err().unwrap());
    assert!(err.contains("model.safetensors.index.json") && err.contains("weight_map"), "{err}");
}

#[test]
fn unsupported_dtype_is_an_error_naming_tensor_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let mut specs = three_dtypes();
    specs.push(("positions".into(), Dtype::I64, vec![2], [7i64, 8].iter().flat_map(|x| x.to_le_bytes()).collect()));
    write_file(&tmp.path().join("model.safetensors"), &specs);
    let src = SafetensorsSource::open(tmp.path()).unwrap();
    assert!(src.contains("positions"));
    let err = message(src.tensor("positions").unwrap_err());
    assert!(err.contains("positions") && err.contains("I64"), "{err}");
    // The other tensors still load.
    assert!(src.tensor("a.f32").is_ok());
}

fn tiny_config(tied: bool) -> LlamaConfig {
    let text = format!(
        r#"{{"model_type":"llama","vocab_size":48,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":{tied}}}"#
    );
    LlamaConfig::from_hf_json(&text).unwrap()
}

#[test]
fn dummy_weights_written_as_safetensors_load_back_with_the_same_names_shapes_and_bytes() {
    for (tied, dtype, st_dtype) in [
        (false, TensorDType::BF16, Dtype::BF16),
        (true, TensorDType::F16, Dtype::F16),
        (false, TensorDType::F32, Dtype::F32),
    ] {
        let config = tiny_config(tied);
        let dummy = DummySource::new(&config, dtype, 42).unwrap();
        let tensors: Vec<_> = dummy.tensor_names().map(|n| dummy.tensor(n).unwrap()).collect();
        let specs: Vec<Spec> =
            tensors.iter().map(|t| (t.name.clone(), st_dtype, t.shape.clone(), t.bytes.as_slice().to_vec())).collect();
        let tmp = tempfile::tempdir().unwrap();
        write_file(&tmp.path().join("model.safetensors"), &specs);

        let src = SafetensorsSource::open(tmp.path()).unwrap();
        let expected = llama_tensor_shapes(&config);
        assert_eq!(src.tensor_names().len(), expected.len());
        assert_eq!(src.contains("lm_head.weight"), !tied);
        for (name, shape) in expected {
            let t = src.tensor(&name).unwrap();
            assert_eq!(t.shape, shape, "{name}");
            assert_eq!(t.bytes.as_slice(), dummy.tensor(&name).unwrap().bytes.as_slice(), "{name}");
        }
    }
}
