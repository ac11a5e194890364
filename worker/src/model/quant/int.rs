//! Packed integer weights with group scales: AutoAWQ's GEMM layout and AutoGPTQ's, read into the
//! f32 values they mean (`[out_features, in_features]`, Hugging Face order).
//!
//! Both store a linear layer `<layer>` as `qweight`, `qzeros` (int32, `32 / bits` values each,
//! lowest bits first) and `scales` (one per group of `group_size` input rows and output column);
//! a weight is `(q - zero) * scale` of its group:
//! - AWQ (`version: gemm`, 4 bits): `qweight` `[in, out / 8]` and `qzeros` `[in / g, out / 8]` pack
//!   8 output columns each, in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble `i` holds
//!   column `8c + ORDER[i]`); `scales` `[in / g, out]`; zero points are required.
//! - GPTQ (4 or 8 bits): `qweight` `[in / pack, out]` packs `pack` input rows each, in order;
//!   `qzeros` `[groups, out / pack]` packs output columns in order and stores `zero - 1` (the v1
//!   format; `checkpoint_format: gptq_v2` stores the zero itself); `scales` `[groups, out]`;
//!   `g_idx` `[in]` names each input row's group (with `desc_act` the rows are not in group
//!   order); without it row `i` is in group `i / g`. `group_size: -1` is one group for the whole
//!   input.
//!
//! Invariants: every packed dimension divides exactly (checked, naming the tensor); a group index
//! outside the scales is an error, never a panic.

use serde_json::{Map, Value};

use super::super::source::{RawTensor, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// AWQ's packing order: nibble `i` of a word holds output column `AWQ_ORDER[i]` of its 8.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// A packed-integer checkpoint's scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntScheme {
    /// `awq` or `gptq`.
    pub method: &'static str,
    pub bits: u32,
    /// Input rows per group (`None`: the whole input is one group).
    pub group_size: Option<usize>,
    /// GPTQ: the stored zero is the zero itself (`gptq_v2`), not `zero - 1`.
    pub v2: bool,
    /// GPTQ: input rows are in activation order, so each layer must carry `g_idx`.
    pub desc_act: bool,
}

impl IntScheme {
    /// The scheme of an `awq` or `gptq` `quantization_config`, or why it cannot run.
    pub fn from_config(method: &str, obj: &Map<String, Value>) -> std::result::Result<IntScheme, String> {
        let bits = obj.get("bits").or_else(|| obj.get("w_bit")).and_then(Value::as_u64).unwrap_or(4);
        let bits = u32::try_from(bits).map_err(|_| format!("bits {bits} is not a bit width"))?;
        // Settings that change what is stored, which this reader does not follow.
        for (key, why) in [
            ("lm_head", "a quantized lm_head is not supported"),
            ("is_marlin_format", "the Marlin repacking of GPTQ weights is not supported"),
        ] {
            if obj.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(format!("{key}: {why}"));
            }
        }
        if obj.get("dynamic").is_some_and(|d| d.as_object().is_some_and(|d| !d.is_empty())) {
            return Err("dynamic: per-layer bits or group sizes are not supported".into());
        }
        let group = obj.get("group_size").or_else(|| obj.get("q_group_size")).and_then(Value::as_i64).unwrap_or(128);
        let group_size = match group {
            -1 => None,
            g if g > 0 => Some(g as usize),
            g => return Err(format!("group_size {g} is not a positive size or -1")),
        };
        match method {
            "awq" => {
                let version = obj.get("version").and_then(Value::as_str).unwrap_or("gemm").to_ascii_lowercase();
                if version != "gemm" {
                    return Err(format!("AWQ version {version:?} is not supported (gemm is)"));
                }
                if bits != 4 {
                    return Err(format!("{bits}-bit AWQ is not supported (4 bits is)"));
                }
                if obj.get("zero_point").and_then(Value::as_bool) == Some(false) {
                    return Err("AWQ without zero points is not supported".into());
                }
                Ok(IntScheme { method: "awq", bits, group_size, v2: false, desc_act: false })
            }
            _ => {
                if !matches!(bits, 4 | 8) {
                    return Err(format!("{bits}-bit GPTQ is not supported (4 and 8 bits are)"));
                }
                let format = obj.get("checkpoint_format").and_then(Value::as_str).unwrap_or("gptq");
                if !matches!(format, "gptq" | "gptq_v2") {
                    return Err(format!("checkpoint_format {format:?} is not supported (gptq, gptq_v2 are)"));
                }
                let desc_act = obj.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
                Ok(IntScheme { method: "gptq", bits, group_size, v2: format == "gptq_v2", desc_act })
            }
        }
    }

    /// Values per int32 word.
    fn pack(&self) -> usize {
        32 / self.bits as usize
    }

    /// The `[rows, cols]` f32 values of the layer whose `weight` would be `name`
    /// (`<layer>.weight`), from its packed tensors in `src`.
    pub fn dequantize(&self, src: &dyn TensorSource, name: &str) -> Result<RawTensor> {
        let layer = name.strip_suffix(".weight").unwrap_or(name);
        let get = |part: &str| src.tensor(&format!("{layer}.{part}"));
        let (qweight, scales) = (get("qweight")?, get("scales")?);
        let zeros = get("qzeros")?;
        let g_idx =
            if self.method == "gptq" && src.contains(&format!("{layer}.g_idx")) { Some(get("g_idx")?) } else { None };
        let values = match self.method {
            "awq" => self.awq(&qweight, &zeros, &scales)?,
            _ => self.gptq(&qweight, &zeros, &scales, g_idx.as_ref())?,
        };
        let (inputs, outputs) = values.1;
        // Stored [in, out]; Hugging Face order is [out, in].
        let mut t = vec![0f32; inputs * outputs];
        for i in 0..inputs {
            for o in 0..outputs {
                t[o * inputs + i] = values.0[i * outputs + o];
            }
        }
        let bytes = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(RawTensor {
            name: name.to_string(),
            dtype: TensorDType::F32,
            shape: vec![outputs, inputs],
            bytes: super::super::source::TensorBytes::Owned(bytes),
        })
    }

    /// AWQ: values `[in, out]` and that shape.
    #[allow(clippy::type_complexity)]
    fn awq(&self, qweight: &RawTensor, qzeros: &RawTensor, scales: &RawTensor) -> Result<(Vec<f32>, (usize, usize))> {
        let (inputs, words) = dims2(qweight)?;
        let outputs = words * 8;
        let group = self.group_size.unwrap_or(inputs);
        let groups = check_groups(qweight, inputs, group)?;
        let s = scales_of(scales, groups, outputs)?;
        let q = ints(qweight)?;
        expect_dims(qzeros, groups, words)?;
        let z = ints(qzeros)?;
        let nibble = |word: i32, i: usize| ((word as u32 >> (4 * i)) & 0xF) as f32;
        let mut out = vec![0f32; inputs * outputs];
        for r in 0..inputs {
            let g = r / group;
            for c in 0..words {
                for (i, &col) in AWQ_ORDER.iter().enumerate() {
                    let o = 8 * c + col;
                    let zero = nibble(z[g * words + c], i);
                    out[r * outputs + o] = (nibble(q[r * words + c], i) - zero) * s[g * outputs + o];
                }
            }
        }
        Ok((out, (inputs, outputs)))
    }

    /// GPTQ: values `[in, out]` and that shape.
    #[allow(clippy::type_complexity)]
    fn gptq(
        &self,
        qweight: &RawTensor,
        qzeros: &RawTensor,
        scales: &RawTensor,
        g_idx: Option<&RawTensor>,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        let pack = self.pack();
        let (packed_rows, outputs) = dims2(qweight)?;
        let inputs = packed_rows * pack;
        let group = self.group_size.unwrap_or(inputs);
        let groups = match g_idx {
            // With g_idx the scales say how many groups there are.
            Some(_) => dims2(scales)?.0,
            None => check_groups(qweight, inputs, group)?,
        };
        let s = scales_of(scales, groups, outputs)?;
        let group_of: Vec<usize> = match g_idx {
            Some(t) => {
                if t.elem_count() != inputs {
                    return Err(WorkerError::tensor(
                        &t.name,
                        format!("holds {} group indices for {inputs} input rows", t.elem_count()),
                    ));
                }
                ints(t)?
                    .into_iter()
                    .map(|g| usize::try_from(g).ok().filter(|&g| g < groups))
                    .collect::<Option<_>>()
                    .ok_or_else(|| WorkerError::tensor(&t.name, format!("a group index outside 0..{groups}")))?
            }
            None if self.desc_act => {
                return Err(WorkerError::tensor(
                    &qweight.name,
                    "desc_act is set but the layer has no g_idx (its rows' groups are unknown)",
                ));
            }
            None => (0..inputs).map(|r| r / group).collect(),
        };
        if !outputs.is_multiple_of(pack) {
            return Err(WorkerError::tensor(&qzeros.name, format!("{outputs} outputs do not pack {pack} to a word")));
        }
        let zero_words = outputs / pack;
        expect_dims(qzeros, groups, zero_words)?;
        let z = ints(qzeros)?;
        let mask = (1u32 << self.bits) - 1;
        let field = |word: i32, i: usize| ((word as u32 >> (self.bits as usize * i)) & mask) as f32;
        let offset = if self.v2 { 0.0 } else { 1.0 };
        let q = ints(qweight)?;
        let mut out = vec![0f32; inputs * outputs];
        for (r, &g) in group_of.iter().enumerate() {
            for o in 0..outputs {
                let value = field(q[(r / pack) * outputs + o], r % pack);
                let zero = field(z[g * zero_words + o / pack], o % pack) + offset;
                out[r * outputs + o] = (value - zero) * s[g * outputs + o];
            }
        }
        Ok((out, (inputs, outputs)))
    }
}

fn dims2(t: &RawTensor) -> Result<(usize, usize)> {
    match t.shape[..] {
        [a, b] => Ok((a, b)),
        _ => Err(WorkerError::tensor(&t.name, format!("expected 2 dimensions, found {:?}", t.shape))),
    }
}

fn expect_dims(t: &RawTensor, rows: usize, cols: usize) -> Result<()> {
    t.expect_shape(&[rows, cols])
}

/// Groups of `group` rows in `inputs`, which must divide.
fn check_groups(t: &RawTensor, inputs: usize, group: usize) -> Result<usize> {
    if group == 0 || !inputs.is_multiple_of(group) {
        return Err(WorkerError::tensor(&t.name, format!("{inputs} input rows do not split into groups of {group}")));
    }
    Ok(inputs / group)
}

fn scales_of(t: &RawTensor, groups: usize, outputs: usize) -> Result<Vec<f32>> {
    expect_dims(t, groups, outputs)?;
    t.to_f32()
}

fn ints(t: &RawTensor) -> Result<Vec<i32>> {
    if t.dtype != TensorDType::I32 {
        return Err(WorkerError::tensor(&t.name, format!("packed integers must be I32, not {:?}", t.dtype)));
    }
    t.check_len()?;
    Ok(t.bytes.as_slice().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
