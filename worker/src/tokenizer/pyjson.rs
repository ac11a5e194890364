//! JSON text exactly as Python's `json.dumps(value, ensure_ascii=False, indent=..., sort_keys=...)`
//! writes it, which is what Hugging Face chat templates expect from `tojson`.
//!
//! Layout: without `indent`, items are separated by `", "` and keys by `": "` on one line; with
//! `indent = n`, one item per line indented by `n` spaces per level, `","` at line ends. Strings
//! escape only `"`, `\`, and control characters (Python's `ensure_ascii=False`). Map keys keep
//! the order of the input map unless `sort_keys` is set.

use serde_json::Value;
use std::fmt::Write;

/// Appends the JSON text of `value` to `out`; `depth` is the current nesting level.
pub(crate) fn write(out: &mut String, value: &Value, indent: Option<usize>, sort_keys: bool, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            write_container(out, '[', ']', items.iter(), indent, depth, |out, item| {
                write(out, item, indent, sort_keys, depth + 1)
            });
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            write_container(out, '{', '}', entries.into_iter(), indent, depth, |out, (k, v)| {
                write_str(out, k);
                out.push_str(": ");
                write(out, v, indent, sort_keys, depth + 1);
            });
        }
    }
}

fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: impl ExactSizeIterator<Item = T>,
    indent: Option<usize>,
    depth: usize,
    mut write_item: impl FnMut(&mut String, T),
) {
    out.push(open);
    if items.len() == 0 {
        out.push(close);
        return;
    }
    for (i, item) in items.enumerate() {
        match indent {
            None if i > 0 => out.push_str(", "),
            None => {}
            Some(n) => {
                if i > 0 {
                    out.push(',');
                }
                newline(out, n * (depth + 1));
            }
        }
        write_item(out, item);
    }
    if let Some(n) = indent {
        newline(out, n * depth);
    }
    out.push(close);
}

fn newline(out: &mut String, spaces: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', spaces));
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    match n.as_f64() {
        // Python writes floats with a fractional part or exponent, never as bare integers.
        Some(f) if n.is_f64() => {
            if !f.is_finite() {
                out.push_str(if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                });
            } else if f.fract() == 0.0 && f.abs() < 1e16 {
                let _ = write!(out, "{f:.1}");
            } else {
                let _ = write!(out, "{f}");
            }
        }
        _ => {
            let _ = write!(out, "{n}");
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dumps(v: &Value, indent: Option<usize>, sort_keys: bool) -> String {
        let mut out = String::new();
        write(&mut out, v, indent, sort_keys, 0);
        out
    }

    #[test]
    fn one_line_layout_uses_python_separators() {
        let v = json!({"a": [1, 2.0, "x\"y\n\u{1}é"], "b": {}, "c": []});
        assert_eq!(dumps(&v, None, false), r#"{"a": [1, 2.0, "x\"y\n\u0001é"], "b": {}, "c": []}"#);
    }

    #[test]
    fn indented_layout_puts_one_item_per_line() {
        let v = json!({"a": [1, {"b": null}]});
        assert_eq!(
            dumps(&v, Some(4), false),
            "{\n    \"a\": [\n        1,\n        {\n            \"b\": null\n        }\n    ]\n}"
        );
    }
}
