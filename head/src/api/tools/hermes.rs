//! `hermes`: calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of
//! Hermes 2 Pro and Qwen 2.5 chat templates (vLLM's `hermes` parser).
//!
//! Text before a `<tool_call>` is content (whitespace just before the tag dropped); after a call, whitespace up to the next
//! `<tool_call>` (or the end) is dropped and any other text is content again. A missing
//! `</tool_call>` after a complete object is forgiven. `<tool_call>` followed by something that
//! is not a call object makes the rest of the output plain content. Tags split across pieces are
//! held back until decided.

use super::json::{OpenedCall, Step};
use super::{Next, ToolCallParser, ToolEvent, content_until, next_tag, text};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Default)]
enum State {
    /// Content, looking for `<tool_call>`.
    #[default]
    Text,
    Call(OpenedCall),
    /// After a call's object: expecting `</tool_call>`.
    AfterCall,
    /// After a call: whitespace is held; `<tool_call>` opens another call.
    Between,
    /// Not a call after all: everything is content.
    Plain,
}

/// The `hermes` parser for one choice.
#[derive(Debug)]
pub struct Hermes {
    state: State,
    held: String,
    well_formed: bool,
}

impl Default for Hermes {
    fn default() -> Self {
        Hermes { state: State::Text, held: String::new(), well_formed: true }
    }
}

impl ToolCallParser for Hermes {
    fn push(&mut self, piece: &str, out: &mut Vec<ToolEvent>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(piece);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match &mut self.state {
                State::Text => match content_until(out, rest, OPEN) {
                    Ok((lead, end)) => {
                        at += end;
                        self.state = State::Call(OpenedCall::new(lead));
                    }
                    Err(from) => {
                        self.held = rest[from..].to_string();
                        return;
                    }
                },
                State::Call(call) => match call.push(rest, out) {
                    Step::More => return,
                    Step::Ended { rest, well_formed } => {
                        self.well_formed &= well_formed;
                        at += rest;
                        self.state = State::AfterCall;
                    }
                    Step::NotACall { rest } => {
                        self.well_formed = false;
                        at += rest;
                        self.state = State::Plain;
                    }
                },
                // Whitespace, then the closing tag (forgiven when something else comes).
                State::AfterCall => match next_tag(rest, CLOSE) {
                    Next::Tag(end) => {
                        at += end;
                        self.state = State::Between;
                    }
                    Next::Undecided => {
                        self.held = rest.to_string();
                        return;
                    }
                    Next::Other(_) => self.state = State::Between,
                },
                State::Between => match next_tag(rest, OPEN) {
                    Next::Tag(end) => {
                        at += end;
                        self.state = State::Call(OpenedCall::new(OPEN));
                    }
                    Next::Undecided => {
                        self.held = rest.to_string();
                        return;
                    }
                    Next::Other(_) => self.state = State::Text,
                },
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
            State::Call(mut call) => {
                self.well_formed = false;
                call.finish(out);
            }
            State::Between if !held.trim().is_empty() => text(out, &held),
            State::AfterCall | State::Between | State::Plain => {}
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
        every_split(Hermes::default, text)
    }

    #[test]
    fn a_call_after_text_splits_into_content_and_the_call() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"°C\"}}\n</tool_call>";
        let (got, ok) = parse(out);
        assert!(ok);
        assert_eq!(got, ("Let me check.".into(), vec![call("get_weather", r#"{"city": "Paris", "unit": "°C"}"#)]));
    }

    #[test]
    fn several_calls_keep_their_order_and_whitespace_between_them_is_dropped() {
        let out = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n<tool_call>\n{\"arguments\": {\"x\": [1, {\"y\": \"}\"}]}, \"name\": \"b\"}\n</tool_call>\n";
        let (got, ok) = parse(out);
        assert!(ok);
        assert_eq!(got, (String::new(), vec![call("a", "{}"), call("b", r#"{"x":[1,{"y":"}"}]}"#)]));
    }

    #[test]
    fn text_that_is_not_a_call_stays_content() {
        for out in
            ["Just an answer with a < sign and <tool", "<tool_call> not json", "<tool_call>{\"x\": 1}</tool_call>"]
        {
            let (got, ok) = parse(out);
            assert_eq!(got, (out.to_string(), vec![]), "{out}");
            assert!(!ok || !out.contains(OPEN), "{out}");
        }
    }

    #[test]
    fn a_truncated_call_keeps_what_it_got_and_is_not_well_formed() {
        let (got, ok) = parse("<tool_call>{\"name\": \"f\", \"arguments\": {\"q\": \"abc");
        assert!(!ok);
        assert_eq!(got, (String::new(), vec![call("f", r#"{"q": "abc"#)]));
        let (got, ok) = parse("Hi <tool_call>{\"name\": \"f\"");
        assert!(!ok);
        assert_eq!(got.0, "Hi <tool_call>{\"name\": \"f\"", "never announced: plain text");
    }

    #[test]
    fn text_after_a_call_is_content_and_a_missing_close_tag_is_forgiven() {
        let (got, ok) = parse("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n\nDone.");
        assert!(ok);
        assert_eq!(got, ("\n\nDone.".into(), vec![call("f", r#"{"a": 1}"#)]));
    }
}
