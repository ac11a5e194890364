//! `llama3_json`: Llama 3.x's JSON tool calls (vLLM's `llama3_json` parser): the answer is
//! `{"name": ..., "parameters": {...}}` (`arguments` is read too), possibly after
//! `<|python_tag|>`, several calls separated by `;`.
//!
//! The output must open with the call (after whitespace and the optional tag); otherwise it is
//! plain content. Text after the calls that is not `; {...}` is content.
//!
//! [`Sequence`] is the shared machinery: a run of call objects with an optional opening, a
//! separator and an optional closing; `required`'s JSON array is another [`Shape`] of it
//! ([`super::forced`]).

use super::json::{OpenedCall, Step, skip_ws};
use super::{ToolCallParser, ToolEvent, text};

/// How a run of call objects is written.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// What may come before the first call (`<|python_tag|>`, `[`).
    pub opening: &'static str,
    /// Whether the opening must come (otherwise the output is content, not well formed).
    pub opening_required: bool,
    pub separator: u8,
    /// What ends the run (`]`), if anything does.
    pub closing: Option<&'static str>,
    /// Whether anything but whitespace outside the calls makes the output malformed.
    pub strict: bool,
}

const LLAMA3: Shape =
    Shape { opening: "<|python_tag|>", opening_required: false, separator: b';', closing: None, strict: false };

/// The `llama3_json` parser for one choice.
pub fn parser() -> Sequence {
    Sequence::new(LLAMA3)
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Start,
    /// Inside a call, opened by whitespace, the tag or a separator.
    Call(OpenedCall),
    Between,
    Closed,
    Plain,
}

/// A run of call objects (see the module docs).
#[derive(Debug)]
pub struct Sequence {
    shape: Shape,
    state: State,
    held: String,
    well_formed: bool,
}

impl Sequence {
    pub fn new(shape: Shape) -> Self {
        Sequence { shape, state: State::Start, held: String::new(), well_formed: true }
    }

    /// Content from here on; malformed if the shape is strict.
    fn plain(&mut self) {
        self.state = State::Plain;
        self.well_formed &= !self.shape.strict;
    }

    /// `rest` opens a call at `j` (after `lead = rest[..j]`), or needs more text, or is content.
    /// Returns how much of `rest` was used when a call starts.
    fn open_call(&mut self, rest: &str, j: usize) -> Option<usize> {
        match rest.as_bytes().get(j) {
            None => {
                self.held = rest.to_string();
                None
            }
            Some(b'{') => {
                self.state = State::Call(OpenedCall::new(&rest[..j]));
                Some(j)
            }
            Some(_) => {
                self.plain();
                Some(0)
            }
        }
    }
}

impl ToolCallParser for Sequence {
    fn push(&mut self, piece: &str, out: &mut Vec<ToolEvent>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(piece);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match &mut self.state {
                State::Start => {
                    let i = skip_ws(rest, 0);
                    let opening = self.shape.opening;
                    if rest[i..].starts_with(opening) {
                        let j = skip_ws(rest, i + opening.len());
                        if let Some(closing) = self.shape.closing
                            && rest[j..].starts_with(closing)
                        {
                            // An empty run: no call at all.
                            self.well_formed &= !self.shape.strict;
                            at += j + closing.len();
                            self.state = State::Closed;
                            continue;
                        }
                        match self.open_call(rest, j) {
                            Some(used) => at += used,
                            None => return,
                        }
                    } else if !self.shape.opening_required && rest[i..].starts_with('{') {
                        self.state = State::Call(OpenedCall::new(&rest[..i]));
                        at += i;
                    } else if i == rest.len() || opening.starts_with(&rest[i..]) {
                        self.held = rest.to_string();
                        return;
                    } else {
                        self.state = State::Plain;
                        self.well_formed &= !self.shape.opening_required;
                    }
                }
                State::Call(call) => match call.push(rest, out) {
                    Step::More => return,
                    Step::Ended { rest, well_formed } => {
                        self.well_formed &= well_formed;
                        at += rest;
                        self.state = State::Between;
                    }
                    Step::NotACall { rest } => {
                        self.well_formed = false;
                        at += rest;
                        self.state = State::Plain;
                    }
                },
                State::Between => {
                    let i = skip_ws(rest, 0);
                    let closing = self.shape.closing.unwrap_or("");
                    if i == rest.len() {
                        self.held = rest.to_string();
                        return;
                    } else if rest.as_bytes()[i] == self.shape.separator {
                        match self.open_call(rest, skip_ws(rest, i + 1)) {
                            Some(used) => at += used,
                            None => return,
                        }
                    } else if !closing.is_empty() && rest[i..].starts_with(closing) {
                        at += i + closing.len();
                        self.state = State::Closed;
                    } else if !closing.is_empty() && closing.starts_with(&rest[i..]) {
                        self.held = rest.to_string();
                        return;
                    } else {
                        self.plain();
                    }
                }
                State::Closed => {
                    let i = skip_ws(rest, 0);
                    if i == rest.len() {
                        return;
                    }
                    self.plain();
                    at += i;
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
            State::Start => {
                text(out, &held);
                self.well_formed &= !self.shape.opening_required;
            }
            State::Call(mut call) => {
                self.well_formed = false;
                call.finish(out);
            }
            State::Between => {
                if !held.trim().is_empty() {
                    text(out, &held);
                }
                self.well_formed &= self.shape.closing.is_none();
            }
            State::Closed | State::Plain => {}
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
        every_split(parser, text)
    }

    #[test]
    fn a_call_with_or_without_the_python_tag() {
        for out in [
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\"}}",
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\"}}",
            "  \n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\"}}  ",
        ] {
            let (got, ok) = parse(out);
            assert!(ok, "{out}");
            assert_eq!(got, (String::new(), vec![call("get_weather", r#"{"city": "Zürich"}"#)]), "{out}");
        }
    }

    #[test]
    fn calls_separated_by_semicolons_and_arguments_spelt_arguments() {
        let out = r#"{"name": "a", "parameters": {"x": "1;2"}}; {"name": "b", "arguments": {}}"#;
        let (got, ok) = parse(out);
        assert!(ok);
        assert_eq!(got, (String::new(), vec![call("a", r#"{"x": "1;2"}"#), call("b", "{}")]));
    }

    #[test]
    fn answers_that_are_not_calls_are_content() {
        for out in ["The weather is fine.", "{\"answer\": 42}", "<|python", "{\"name\": 3, \"parameters\": {}}", ""] {
            let (got, _) = parse(out);
            assert_eq!(got, (out.to_string(), vec![]), "{out}");
        }
    }

    #[test]
    fn text_after_a_call_is_content_and_a_truncated_call_is_malformed() {
        let (got, ok) = parse("{\"name\": \"f\", \"parameters\": {\"a\": true}} then text");
        assert!(ok);
        assert_eq!(got, (" then text".into(), vec![call("f", r#"{"a": true}"#)]));
        let (got, ok) = parse("{\"name\": \"f\", \"parameters\": {\"a\": [1, 2");
        assert!(!ok);
        assert_eq!(got, (String::new(), vec![call("f", r#"{"a": [1, 2"#)]));
    }
}
