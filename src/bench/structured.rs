//! Structured outputs in `lumen bench offline` and `lumen bench serve`: which requests run under
//! the benchmark's JSON schema (`--structured-fraction`), the schema itself, and the mask
//! computation time per token read from the engine's histogram (in-process for `offline`, from
//! `/metrics` before and after the run for `serve`).
//!
//! The schema is a list of at least 32 small records, so no constrained request can complete it
//! within a few hundred tokens: like the free requests (`ignore_eos`), each runs to
//! `--output-len` and the throughputs compare like with like.

use serde_json::{Value, json};

/// The mask-time histogram's series (the worker exports it; see `lumen_proto::metrics`).
pub const MASK_SERIES: &str = "lumen:structured_output_mask_seconds";

/// The benchmark's JSON schema.
pub fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "events": {
                "type": "array",
                "minItems": 32,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
                        "kind": {"enum": ["click", "view", "purchase", "refund"]},
                        "ok": {"type": "boolean"},
                        "note": {"type": "string", "maxLength": 24}
                    },
                    "required": ["id", "kind", "ok", "note"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["events"],
        "additionalProperties": false
    })
}

/// Whether request `i` runs under the schema: `fraction` of the requests, spread evenly.
pub fn is_constrained(i: usize, fraction: f64) -> bool {
    let f = fraction.clamp(0.0, 1.0);
    ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
}

/// Checks `--structured-fraction`.
pub fn check_fraction(fraction: f64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&fraction) {
        anyhow::bail!("--structured-fraction must be in [0, 1], got {fraction}");
    }
    Ok(())
}

/// A cumulative histogram: upper bounds ascending and the count at or below each, then the total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
}

impl Buckets {
    /// The observations of `self` that `earlier` had not seen (both of one histogram).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let before = |i: usize| earlier.cumulative.get(i).copied().unwrap_or(0);
        Buckets {
            bounds: self.bounds.clone(),
            cumulative: self.cumulative.iter().enumerate().map(|(i, &c)| c.saturating_sub(before(i))).collect(),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// The `q` quantile, interpolated linearly inside its bucket (as Prometheus'
    /// `histogram_quantile`); `None` without observations. Beyond the last bound: that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (&bound, &cum) in self.bounds.iter().zip(&self.cumulative) {
            if cum as f64 >= rank && cum > below {
                return Some(lower + (bound - lower) * (rank - below as f64) / (cum - below) as f64);
            }
            below = cum;
            lower = bound;
        }
        self.bounds.last().copied()
    }

    /// Reads `series` from a Prometheus text page, summing its label sets (replicas).
    pub fn from_prometheus(text: &str, series: &str) -> Buckets {
        let mut by_bound: Vec<(f64, u64)> = Vec::new();
        let mut count = 0u64;
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let value = value.parse::<f64>().unwrap_or(0.0) as u64;
            if let Some(labels) = name.strip_prefix(&format!("{series}_bucket")) {
                let le = labels.split("le=\"").nth(1).and_then(|s| s.split('"').next());
                match le.map(str::parse::<f64>) {
                    Some(Ok(bound)) if bound.is_finite() => match by_bound.iter_mut().find(|(b, _)| *b == bound) {
                        Some((_, c)) => *c += value,
                        None => by_bound.push((bound, value)),
                    },
                    _ => {}
                }
            } else if name.starts_with(&format!("{series}_count")) {
                count += value;
            }
        }
        by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets {
            bounds: by_bound.iter().map(|b| b.0).collect(),
            cumulative: by_bound.iter().map(|b| b.1).collect(),
            count,
        }
    }
}

/// p50 and p99 of a mask-time histogram, in milliseconds.
pub fn mask_ms(buckets: &Buckets) -> Option<(f64, f64)> {
    Some((buckets.quantile(0.5)? * 1e3, buckets.quantile(0.99)? * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_spread_constrained_requests_evenly() {
        let picked = |f: f64| (0..8).filter(|&i| is_constrained(i, f)).count();
        assert_eq!((picked(0.0), picked(0.5), picked(1.0)), (0, 4, 8));
        assert!(is_constrained(1, 0.5) && !is_constrained(0, 0.5));
        assert!(check_fraction(1.5).is_err() && check_fraction(0.5).is_ok());
    }

    #[test]
    fn quantiles_interpolate_inside_buckets_and_difference_runs() {
        let page = "# TYPE x histogram\n\
            lumen:structured_output_mask_seconds_bucket{model_name=\"a\",le=\"0.001\"} 50\n\
            lumen:structured_output_mask_seconds_bucket{model_name=\"a\",le=\"0.002\"} 100\n\
            lumen:structured_output_mask_seconds_bucket{model_name=\"a\",le=\"+Inf\"} 100\n\
            lumen:structured_output_mask_seconds_count{model_name=\"a\"} 100\n";
        let b = Buckets::from_prometheus(page, MASK_SERIES);
        assert_eq!((b.bounds.clone(), b.cumulative.clone(), b.count), (vec![0.001, 0.002], vec![50, 100], 100));
        assert!((b.quantile(0.5).unwrap() - 0.001).abs() < 1e-12);
        assert!((b.quantile(0.75).unwrap() - 0.0015).abs() < 1e-12);
        let none = b.since(&b);
        assert_eq!((none.count, none.quantile(0.5)), (0, None));
        assert!((mask_ms(&b).unwrap().1 - 1.98).abs() < 1e-9);
    }
}
