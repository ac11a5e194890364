//! Random weights for a [`LlamaConfig`] (`load_format: dummy`, as in vLLM): for benchmarks and
//! tests that need a model of a real shape without its checkpoint.
//!
//! Contract:
//! - Names and shapes are exactly those of a Hugging Face Llama checkpoint
//!   ([`llama_tensor_shapes`]): `model.embed_tokens.weight [vocab, hidden]`, per layer
//!   `self_attn.{q,k,v,o}_proj.weight`, `mlp.{gate,up,down}_proj.weight`,
//!   `input_layernorm.weight`, `post_attention_layernorm.weight`, then `model.norm.weight` and,
//!   unless embeddings are tied, `lm_head.weight [vocab, hidden]`. Linear weights are
//!   `[out_features, in_features]`.
//! - Values are uniform in `[-1e-3, 1e-3]` (vLLM's dummy range), except RMSNorm weights, which
//!   are exactly 1.0 so activations keep their scale through the layers.
//! - Deterministic: the bytes of a tensor depend only on (seed, tensor name, dtype, shape), never
//!   on the order tensors are asked for. Each tensor draws from its own ChaCha8 stream (seeded by
//!   `seed`, stream number = a fixed FNV-1a hash of the name).
//! - Lazy: nothing is generated until [`TensorSource::tensor`] asks, and the result is owned by
//!   the caller (nothing is cached), so an 8B-parameter model never sits in memory twice.

use std::collections::BTreeMap;

use half::{bf16, f16};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::config::LlamaConfig;
use super::source::{RawTensor, TensorBytes, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// Half-width of the uniform range of non-norm weights.
pub const DUMMY_WEIGHT_RANGE: f32 = 1e-3;

/// Every tensor a Llama checkpoint holds, with its Hugging Face name and shape, in file order.
pub fn llama_tensor_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) = (config.q_dim(), config.kv_dim());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Whether `name` is an RMSNorm weight (filled with ones rather than noise).
fn is_norm(name: &str) -> bool {
    name.ends_with("layernorm.weight") || name == "model.norm.weight"
}

/// Random weights of a Llama shape, generated on demand.
pub struct DummySource {
    dtype: TensorDType,
    seed: u64,
    shapes: BTreeMap<String, Vec<usize>>,
    encoding: Encoding,
}

/// How random bits become element bytes.
enum Encoding {
    F32,
    /// For 16-bit dtypes: the encoded value for each of the 65536 possible 16-bit draws.
    Half(Box<[u16; 1 << 16]>),
}

/// The 16-bit encoding of every possible draw, through `encode` (f16 or bf16 rounding).
fn half_table(encode: impl Fn(f32) -> u16) -> Box<[u16; 1 << 16]> {
    let mut table = Box::new([0u16; 1 << 16]);
    for (r, slot) in table.iter_mut().enumerate() {
        *slot = encode(uniform_from_u16(r as u16));
    }
    table
}

impl DummySource {
    /// A source of random `dtype` weights for `config`; `dtype` must be F32, F16 or BF16.
    pub fn new(config: &LlamaConfig, dtype: TensorDType, seed: u64) -> Result<Self> {
        config.check()?;
        let encoding = match dtype {
            TensorDType::F32 => Encoding::F32,
            TensorDType::F16 => Encoding::Half(half_table(|x| f16::from_f32(x).to_bits())),
            TensorDType::BF16 => Encoding::Half(half_table(|x| bf16::from_f32(x).to_bits())),
            other => {
                return Err(WorkerError::invalid(
                    "dtype",
                    format!("dummy weights are F32, F16 or BF16, not {other:?}"),
                ));
            }
        };
        Ok(DummySource { dtype, seed, shapes: llama_tensor_shapes(config).into_iter().collect(), encoding })
    }

    /// The element type of every tensor.
    pub fn dtype(&self) -> TensorDType {
        self.dtype
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    /// Fills `out` (already sized to the tensor) with the tensor's little-endian element bytes.
    fn fill(&self, name: &str, out: &mut [u8]) {
        if is_norm(name) {
            let one: &[u8] = match self.dtype {
                TensorDType::F16 => &f16::ONE.to_le_bytes(),
                TensorDType::BF16 => &bf16::ONE.to_le_bytes(),
                _ => &1.0f32.to_le_bytes(),
            };
            out.chunks_exact_mut(one.len()).for_each(|c| c.copy_from_slice(one));
            return;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        fill_random(self.seed, fnv1a(name), out, threads, |chunk| self.encode(chunk));
    }

    /// Turns raw random bytes into element values in place: 16 random bits per half-precision
    /// element (finer than their mantissa), 24 per f32 element (exactly its mantissa width).
    fn encode(&self, chunk: &mut [u8]) {
        match &self.encoding {
            Encoding::F32 => {
                for c in chunk.chunks_exact_mut(4) {
                    let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >> 8;
                    c.copy_from_slice(&uniform_from_u24(r).to_le_bytes());
                }
            }
            Encoding::Half(table) => {
                for c in chunk.chunks_exact_mut(2) {
                    c.copy_from_slice(&table[u16::from_le_bytes([c[0], c[1]]) as usize].to_le_bytes());
                }
            }
        }
    }
}

/// Bytes of output per unit of work; a multiple of 4 so each chunk starts on a ChaCha word.
const CHUNK_BYTES: usize = 1 << 20;

/// Fills `out` with the ChaCha8 stream (`seed`, `stream`) from its start, then applies `encode`
/// to each chunk while it is still in cache. Chunks are spread over up to `threads` threads;
/// each seeks to its own word offset, so the bytes are those of one sequential stream whatever
/// the thread count.
fn fill_random(seed: u64, stream: u64, out: &mut [u8], threads: usize, encode: impl Fn(&mut [u8]) + Sync) {
    let chunks = out.len().div_ceil(CHUNK_BYTES);
    let per_thread = chunks.div_ceil(threads.clamp(1, chunks.max(1))).max(1) * CHUNK_BYTES;
    let work = |first_chunk: usize, part: &mut [u8]| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        rng.set_word_pos((first_chunk * CHUNK_BYTES / 4) as u128);
        for chunk in part.chunks_mut(CHUNK_BYTES) {
            rng.fill_bytes(chunk);
            encode(chunk);
        }
    };
    if out.len() <= per_thread {
        work(0, out);
        return;
    }
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per_thread).enumerate() {
            let work = &work;
            scope.spawn(move || work(i * per_thread / CHUNK_BYTES, part));
        }
    });
}

/// Maps a 16-bit draw to the midpoint of one of 65536 equal bins of `[-range, range]`.
fn uniform_from_u16(r: u16) -> f32 {
    ((r as f32 + 0.5) / 65536.0 * 2.0 - 1.0) * DUMMY_WEIGHT_RANGE
}

/// Maps a 24-bit draw to `[-range, range)`.
fn uniform_from_u24(r: u32) -> f32 {
    (r as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * DUMMY_WEIGHT_RANGE
}

/// 64-bit FNV-1a: a hash whose value is fixed forever (unlike std's `DefaultHasher`).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl TensorSource for DummySource {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let shape =
            self.shapes.get(name).ok_or_else(|| WorkerError::tensor(name, format!("not in {}", self.describe())))?;
        let elems: usize = shape.iter().product();
        let mut bytes = vec![0u8; self.dtype.row_bytes(elems)];
        self.fill(name, &mut bytes);
        Ok(RawTensor {
            name: name.to_string(),
            dtype: self.dtype,
            shape: shape.clone(),
            bytes: TensorBytes::Owned(bytes),
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    fn describe(&self) -> String {
        format!("dummy {:?} weights (seed {})", self.dtype, self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 40,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope: crate::model::Rope::plain(10_000.0),
            max_position_embeddings: 128,
            tie_word_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: None,
            sliding_window: None,
            quantization: None,
        }
    }

    #[test]
    fn names_and_shapes_cover_every_llama_tensor() {
        let src = DummySource::new(&tiny(false), TensorDType::F32, 0).unwrap();
        assert_eq!(src.tensor_names().count(), 1 + 2 * 9 + 1 + 1);
        let want = [
            ("model.embed_tokens.weight", vec![32, 16]),
            ("model.layers.1.self_attn.q_proj.weight", vec![16, 16]),
            ("model.layers.1.self_attn.k_proj.weight", vec![8, 16]),
            ("model.layers.1.self_attn.v_proj.weight", vec![8, 16]),
            ("model.layers.1.self_attn.o_proj.weight", vec![16, 16]),
            ("model.layers.0.mlp.gate_proj.weight", vec![40, 16]),
            ("model.layers.0.mlp.up_proj.weight", vec![40, 16]),
            ("model.layers.0.mlp.down_proj.weight", vec![16, 40]),
            ("model.layers.0.input_layernorm.weight", vec![16]),
            ("model.layers.0.post_attention_layernorm.weight", vec![16]),
            ("model.norm.weight", vec![16]),
            ("lm_head.weight", vec![32, 16]),
        ];
        for (name, shape) in want {
            let t = src.tensor(name).unwrap();
            assert_eq!(t.shape, shape, "{name}");
            t.check_len().unwrap();
        }
        assert!(!src.contains("model.layers.2.mlp.up_proj.weight"));
        assert!(src.tensor("model.layers.2.mlp.up_proj.weight").is_err());
    }

    #[test]
    fn tied_embeddings_have_no_lm_head() {
        let src = DummySource::new(&tiny(true), TensorDType::BF16, 0).unwrap();
        assert!(!src.contains("lm_head.weight"));
        assert!(src.contains("model.embed_tokens.weight"));
    }

    #[test]
    fn same_seed_gives_same_bytes_in_any_order_and_other_seeds_differ() {
        for dtype in [TensorDType::F32, TensorDType::F16, TensorDType::BF16] {
            let a = DummySource::new(&tiny(false), dtype, 7).unwrap();
            let b = DummySource::new(&tiny(false), dtype, 7).unwrap();
            let c = DummySource::new(&tiny(false), dtype, 8).unwrap();
            let name = "model.layers.1.mlp.down_proj.weight";
            let _ = b.tensor("model.embed_tokens.weight").unwrap();
            let ta = a.tensor(name).unwrap();
            assert_eq!(ta.bytes.as_slice(), b.tensor(name).unwrap().bytes.as_slice(), "{dtype:?}");
            assert_ne!(ta.bytes.as_slice(), c.tensor(name).unwrap().bytes.as_slice(), "{dtype:?}");
            // Different tensors of the same shape get different values.
            let up = a.tensor("model.layers.1.mlp.up_proj.weight").unwrap();
            let gate = a.tensor("model.layers.1.mlp.gate_proj.weight").unwrap();
            assert_ne!(up.bytes.as_slice(), gate.bytes.as_slice());
        }
    }

    #[test]
    fn weights_are_small_and_centered_and_norms_are_one() {
        for dtype in [TensorDType::F32, TensorDType::F16, TensorDType::BF16] {
            let src = DummySource::new(&tiny(false), dtype, 3).unwrap();
            let w = src.tensor("model.embed_tokens.weight").unwrap().to_f32().unwrap();
            // bf16 rounding may land a hair outside the f32 bound.
            assert!(w.iter().all(|x| x.abs() <= DUMMY_WEIGHT_RANGE * 1.01), "{dtype:?}");
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            assert!(mean.abs() < 2e-4, "{dtype:?} mean {mean}");
            let spread = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(spread > 5e-4, "{dtype:?} values collapsed: max |x| {spread}");
            for name in [
                "model.layers.0.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
                "model.norm.weight",
            ] {
                assert!(src.tensor(name).unwrap().to_f32().unwrap().iter().all(|&x| x == 1.0), "{dtype:?} {name}");
            }
        }
    }

    #[test]
    fn parallel_fill_equals_one_sequential_stream() {
        let len = 3 * CHUNK_BYTES + 4 * 1000;
        let mut sequential = vec![0u8; len];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        rng.set_stream(fnv1a("w"));
        rng.fill_bytes(&mut sequential);
        for threads in [1, 2, 3, 8] {
            let mut out = vec![0u8; len];
            fill_random(9, fnv1a("w"), &mut out, threads, |_| {});
            assert!(out == sequential, "{threads} threads changed the bytes");
        }
    }

    #[test]
    fn quantized_dtypes_are_refused() {
        let err = DummySource::new(&tiny(false), TensorDType::Ggml(candle_core::quantized::GgmlDType::Q4_0), 0);
        assert!(matches!(err, Err(WorkerError::InvalidParameter { param: "dtype", .. })));
    }
}
