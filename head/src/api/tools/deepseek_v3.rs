//! `deepseek_v3`: DeepSeek's tool-call tokens, as DeepSeek-V3 and the DeepSeek-R1 distills'
//! chat template write them (vLLM's `deepseek_v3` parser):
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! {"arg": ...}
//! ```<｜tool▁call▁end｜>
//! <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! Text before `<｜tool▁calls▁begin｜>` is content (whitespace just before it dropped); a call is announced when its arguments
//! begin (after `` ```json ``), which streams them as they come. Whitespace between calls is
//! dropped; text after `<｜tool▁calls▁end｜>` is content. A missing `<｜tool▁calls▁end｜>` at
//! the end is forgiven; a call whose header or closing does not have this shape makes the output
//! malformed (the rest is content). Markers split across pieces are held back until decided.

use super::json::{Scan, ValueScan, skip_ws};
use super::{ToolCallParser, ToolEvent, content_until, text};

const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALLS_END: &str = "<｜tool▁calls▁end｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";
const FENCE: &str = "```json";
/// The longest header (`function<｜tool▁sep｜>NAME\n```json\n`) or closing waited for before the
/// call is judged malformed.
const MARKUP_LIMIT: usize = 512;

#[derive(Debug, Default)]
enum State {
    /// Content, looking for the calls' opening.
    #[default]
    Text,
    /// Inside the calls, between two calls.
    Calls,
    /// A call's header so far (after `<｜tool▁call▁begin｜>`).
    Header(String),
    /// The arguments, streaming; their text so far (to check it parses).
    Arguments { scan: ValueScan, text: String },
    /// After the arguments: `` ``` `` and `<｜tool▁call▁end｜>`, so far.
    Closing(String),
    /// After the calls' end: whitespace is dropped, then content.
    After,
    /// Content to the end.
    Plain,
}

/// The `deepseek_v3` parser for one choice.
#[derive(Debug)]
pub struct DeepseekV3 {
    state: State,
    held: String,
    well_formed: bool,
}

impl Default for DeepseekV3 {
    fn default() -> Self {
        DeepseekV3 { state: State::Text, held: String::new(), well_formed: true }
    }
}

/// The name and where the arguments start in a complete `header`, `None` if it needs more text,
/// `Some(Err(()))` if it is malformed.
fn read_header(header: &str) -> Option<Result<(String, usize), ()>> {
    let Some(fence) = header.find(FENCE) else {
        return (header.len() > MARKUP_LIMIT || header.contains(CALL_END)).then_some(Err(()));
    };
    let start = skip_ws(header, fence + FENCE.len());
    if start == header.len() {
        return None;
    }
    let name = header[..fence].split_once(SEP).map(|(_, name)| name.trim()).filter(|n| !n.is_empty());
    Some(name.map(|name| (name.to_string(), start)).ok_or(()))
}

impl DeepseekV3 {
    /// A malformed call: what was read of it becomes content, as does everything after.
    fn malformed(&mut self, read: &str, out: &mut Vec<ToolEvent>) {
        self.well_formed = false;
        text(out, read);
        self.state = State::Plain;
    }
}

impl ToolCallParser for DeepseekV3 {
    fn push(&mut self, piece: &str, out: &mut Vec<ToolEvent>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(piece);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match &mut self.state {
                State::Text => match content_until(out, rest, CALLS_BEGIN) {
                    Ok((_, end)) => {
                        at += end;
                        self.state = State::Calls;
                    }
                    Err(from) => {
                        self.held = rest[from..].to_string();
                        return;
                    }
                },
                State::Calls => {
                    let trimmed = rest.trim_start();
                    if let Some(after) = trimmed.strip_prefix(CALL_BEGIN) {
                        at = buf.len() - after.len();
                        self.state = State::Header(String::new());
                    } else if let Some(after) = trimmed.strip_prefix(CALLS_END) {
                        at = buf.len() - after.len();
                        self.state = State::After;
                    } else if trimmed.is_empty() || CALL_BEGIN.starts_with(trimmed) || CALLS_END.starts_with(trimmed) {
                        self.held = rest.to_string();
                        return;
                    } else {
                        self.malformed("", out);
                    }
                }
                State::Header(header) => {
                    header.push_str(rest);
                    match read_header(header) {
                        None => return,
                        Some(Err(())) => {
                            let read = format!("{CALL_BEGIN}{header}");
                            self.malformed(&read, out);
                            return;
                        }
                        Some(Ok((name, start))) => {
                            let args = header[start..].to_string();
                            out.push(ToolEvent::Begin { name });
                            self.state = State::Arguments { scan: ValueScan::default(), text: String::new() };
                            buf = args;
                            at = 0;
                        }
                    }
                }
                State::Arguments { scan, text: args } => {
                    let (piece, next) = match scan.feed(rest) {
                        Scan::More => (rest, None),
                        Scan::End(n) => (&rest[..n], Some(n)),
                        Scan::Invalid => ("", Some(0)),
                    };
                    args.push_str(piece);
                    if !piece.is_empty() {
                        out.push(ToolEvent::Arguments(piece.to_string()));
                    }
                    let Some(n) = next else { return };
                    self.well_formed &= serde_json::from_str::<serde_json::Value>(args).is_ok();
                    at += n;
                    self.state = State::Closing(String::new());
                }
                State::Closing(closing) => {
                    closing.push_str(rest);
                    let Some(end) = closing.find(CALL_END) else {
                        if closing.len() > MARKUP_LIMIT {
                            let read = std::mem::take(closing);
                            self.malformed(&read, out);
                        }
                        return;
                    };
                    let fence = closing[..end].trim();
                    self.well_formed &= fence.is_empty() || fence == "```";
                    buf = closing[end + CALL_END.len()..].to_string();
                    at = 0;
                    self.state = State::Calls;
                }
                State::After => {
                    let trimmed = rest.trim_start();
                    if trimmed.is_empty() {
                        return;
                    }
                    at = buf.len() - trimmed.len();
                    self.state = State::Plain;
                }
                State::Plain => {
                    text(out, rest);
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        let held = std::mem::take(&mut self.held);
        match std::mem::replace(&mut self.state, State::Plain) {
            State::Text => text(out, &held),
            State::Header(header) => self.malformed(&format!("{CALL_BEGIN}{header}"), out),
            State::Arguments { .. } | State::Closing(_) => self.well_formed = false,
            State::Calls | State::After | State::Plain => {}
        }
    }

    fn well_formed(&self) -> bool {
        self.well_formed
    }
}

#[cfg(test)]
mod tests {
    use super::super::{call, every_split};
    use super::*;

    fn parse(text: &str) -> ((String, Vec<(String, String)>), bool) {
        every_split(DeepseekV3::default, text)
    }

    /// One call as DeepSeek-R1-Distill's chat template writes it.
    fn written(name: &str, arguments: &str) -> String {
        format!("{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}")
    }

    #[test]
    fn calls_as_the_r1_distill_template_writes_them() {
        let out = format!(
            "I will look it up.{CALLS_BEGIN}{}\n{}{CALLS_END}",
            written("get_weather", r#"{"location": "Beijing"}"#),
            written("get_time", r#"{"tz": "Asia/Shanghai", "fmt": "```"}"#)
        );
        let (got, ok) = parse(&out);
        assert!(ok);
        assert_eq!(
            got,
            (
                "I will look it up.".into(),
                vec![
                    call("get_weather", r#"{"location": "Beijing"}"#),
                    call("get_time", r#"{"tz": "Asia/Shanghai", "fmt": "```"}"#)
                ]
            )
        );
    }

    #[test]
    fn text_without_the_markers_is_content() {
        for out in ["plain answer", "a ｜ b <｜tool", "```json\n{}\n```"] {
            let (got, ok) = parse(out);
            assert!(ok);
            assert_eq!(got, (out.to_string(), vec![]), "{out}");
        }
    }

    #[test]
    fn a_missing_calls_end_is_forgiven_and_text_after_the_calls_is_content() {
        let (got, ok) = parse(&format!("{CALLS_BEGIN}{}", written("f", "{}")));
        assert!(ok);
        assert_eq!(got, (String::new(), vec![call("f", "{}")]));
        let (got, ok) = parse(&format!("{CALLS_BEGIN}{}{CALLS_END}\n\nDone", written("f", "{}")));
        assert!(ok);
        assert_eq!(got, ("Done".into(), vec![call("f", "{}")]));
    }

    #[test]
    fn malformed_and_truncated_calls_are_not_well_formed() {
        let (got, ok) = parse(&format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{\"a\": "));
        assert!(!ok);
        assert_eq!(got, (String::new(), vec![call("f", r#"{"a": "#)]));
        let (got, ok) = parse(&format!("{CALLS_BEGIN}{CALL_BEGIN}no separator\n```json\n{{}}"));
        assert!(!ok);
        assert!(got.1.is_empty() && got.0.contains("no separator"), "{got:?}");
    }
}
