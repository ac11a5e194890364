use serde_json::{Value, json};

use super::*;

/// Parses a rope dict written as JSON for heads of `dim` and a model of `max_pos` positions.
fn parse(theta: f64, dict: Value, dim: usize, max_pos: usize) -> Result<Rope> {
    let map = dict.as_object().unwrap().clone();
    Rope::parse(theta, &RopeParams::new("rope_parameters", &map, dim, max_pos))
}

fn base(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64)).collect()
}

fn close(a: f32, b: f64) -> bool {
    ((a as f64) - b).abs() <= 1e-6 * b.abs().max(1e-30)
}

fn err(r: Result<Rope>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn default_is_plain_rope_and_linear_divides_every_frequency() {
    let plain = parse(10_000.0, json!({"rope_type": "default"}), 16, 64).unwrap();
    assert_eq!(plain.type_name(), "default");
    let f = plain.frequencies(16, 64, 64);
    assert!(f.inv_freq.iter().zip(base(10_000.0, 16)).all(|(&a, b)| close(a, b)));
    assert_eq!(f.attention_factor, 1.0);

    let linear = parse(10_000.0, json!({"type": "linear", "factor": 4}), 16, 64).unwrap();
    let f = linear.frequencies(16, 64, 64);
    assert!(f.inv_freq.iter().zip(base(10_000.0, 16)).all(|(&a, b)| close(a, b / 4.0)));
}

#[test]
fn dynamic_uses_the_base_transformers_reaches_at_factor_times_max_positions() {
    // transformers: base * (factor * seq_len / max_pos - (factor - 1)) ^ (dim / (dim - 2)) at the
    // current seq_len; Lumen (as vLLM) fixes seq_len = factor * max_pos for every position.
    let (theta, dim, max_pos, factor) = (10_000.0, 16usize, 32usize, 3.0);
    let rope = parse(theta, json!({"rope_type": "dynamic", "factor": factor}), dim, max_pos).unwrap();
    let seq_len = factor * max_pos as f64;
    let grown = theta * (factor * seq_len / max_pos as f64 - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
    // The same however long the server's sequences may be: the base does not follow max_model_len.
    for max_model_len in [16, 96, 4096] {
        let f = rope.frequencies(dim, max_pos, max_model_len);
        assert!(f.inv_freq.iter().zip(base(grown, dim)).all(|(&a, b)| close(a, b)), "{max_model_len}");
        assert_eq!(f.attention_factor, 1.0);
    }
}

#[test]
fn longrope_uses_long_factors_exactly_when_max_model_len_exceeds_the_original_context() {
    let (dim, max_pos, original) = (8usize, 64usize, 16usize);
    let dict = json!({"rope_type": "longrope", "short_factor": [1, 2, 3, 4], "long_factor": [5, 6, 7, 8],
                      "original_max_position_embeddings": original});
    let rope = parse(10_000.0, dict, dim, max_pos).unwrap();
    let b = base(10_000.0, dim);
    // factor = 64 / 16 = 4; attention factor sqrt(1 + ln 4 / ln 16) = sqrt(1.5).
    let want_attention = 1.5f64.sqrt();
    for (max_model_len, divisors) in
        [(16, [1.0, 2.0, 3.0, 4.0]), (17, [5.0, 6.0, 7.0, 8.0]), (64, [5.0, 6.0, 7.0, 8.0])]
    {
        let f = rope.frequencies(dim, max_pos, max_model_len);
        assert!(f.inv_freq.iter().zip(&b).zip(divisors).all(|((&a, b), d)| close(a, b / d)), "{max_model_len}");
        assert!(close(f.attention_factor, want_attention));
    }
    let wrong_len = json!({"rope_type": "longrope", "short_factor": [1, 2], "long_factor": [5, 6, 7, 8]});
    assert!(err(parse(10_000.0, wrong_len, dim, max_pos)).contains("`rope_parameters.short_factor`"));
}

#[test]
fn yarn_keeps_fast_frequencies_interpolates_slow_ones_and_scales_attention() {
    let (theta, dim, factor) = (10_000.0, 64usize, 4.0);
    let dict = json!({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 2048});
    let f = parse(theta, dict, dim, 8192).unwrap().frequencies(dim, 8192, 8192);
    let b = base(theta, dim);
    // The dimensions that turn 32 (beta_fast) and 1 (beta_slow) times over 2048 positions,
    // rounded outwards: 8.06 -> 8 and 20.1 -> 21.
    let correction =
        |turns: f64| dim as f64 * (2048.0 / (turns * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (low, high) = (correction(32.0).floor(), correction(1.0).ceil());
    assert_eq!((low, high), (8.0, 21.0));
    for (i, (&got, b)) in f.inv_freq.iter().zip(&b).enumerate() {
        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
        assert!(close(got, b * (1.0 - ramp) + b / factor * ramp), "dim {i}");
    }
    assert!(close(f.inv_freq[0], b[0]) && close(f.inv_freq[31], b[31] / factor));
    assert!(close(f.attention_factor, 0.1 * factor.ln() + 1.0));

    // attention_factor wins; else mscale / mscale_all_dim when both are set.
    let explicit = json!({"rope_type": "yarn", "factor": 4, "attention_factor": 0.5});
    assert_eq!(parse(theta, explicit, dim, 256).unwrap().frequencies(dim, 256, 256).attention_factor, 0.5);
    let ratio = json!({"rope_type": "yarn", "factor": 4, "mscale": 2, "mscale_all_dim": 1});
    let got = parse(theta, ratio, dim, 256).unwrap().frequencies(dim, 256, 256).attention_factor;
    assert!(close(got, (0.2 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0)));
    // transformers requires `factor` (an explicit null means max_position_embeddings / original).
    assert!(err(parse(theta, json!({"rope_type": "yarn"}), dim, 256)).contains("`rope_parameters.factor`"));
    let derived = json!({"rope_type": "yarn", "factor": null, "original_max_position_embeddings": 64});
    let got = parse(theta, derived, dim, 256).unwrap().frequencies(dim, 256, 256).attention_factor;
    assert!(close(got, 0.1 * 4f64.ln() + 1.0));
}

#[test]
fn unknown_types_and_keys_no_formula_reads_are_refused_by_name() {
    let e = err(parse(10_000.0, json!({"rope_type": "su"}), 16, 64));
    assert!(e.contains("`rope_parameters.rope_type` = \"su\"") && e.contains("llama3, yarn, longrope"), "{e}");
    // vLLM's own yarn knob, which transformers does not read.
    let e = err(parse(10_000.0, json!({"rope_type": "yarn", "factor": 4, "attn_factor": 2}), 16, 64));
    assert!(e.contains("`rope_parameters.attn_factor` = 2"), "{e}");
    let e = err(parse(10_000.0, json!({"rope_type": "linear", "factor": 2, "low_freq_factor": 1}), 16, 64));
    assert!(e.contains("`rope_parameters.low_freq_factor`") && e.contains("`linear`"), "{e}");
    let e = err(parse(10_000.0, json!({"rope_type": "linear"}), 16, 64));
    assert!(e.contains("`rope_parameters.factor` = missing"), "{e}");
    let e = err(parse(10_000.0, json!({"rope_type": "llama3", "type": "linear", "factor": 2}), 16, 64));
    assert!(e.contains("rope_parameters.rope_type") && e.contains("rope_parameters.type"), "{e}");
    // Informational and null keys change nothing.
    assert!(
        parse(10_000.0, json!({"type": "linear", "factor": 2, "finetuned": true, "beta_fast": null}), 16, 64).is_ok()
    );
}
