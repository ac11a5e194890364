//! Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`), as vLLM serves it.
//!
//! - [`request`]: the request's fields, checked (`tools` and their JSON Schemas in [`schema`],
//!   `tool_choice` against the tools and the server's settings), and what goes to the chat
//!   template (`tools`). [`messages`] checks assistant `tool_calls` and `tool` messages.
//! - Parsers for `tool_choice: "auto"`, one module each, by vLLM's `--tool-call-parser` names:
//!   [`llama3_json`], [`hermes`], [`deepseek_v3`]. Each turns the model's answer, piece by piece,
//!   into [`ToolEvent`]s; [`forced`] reads the output of a `required` or named `tool_choice`.
//! - [`output`]: per choice, the reasoning split first (`--reasoning-parser`), then the tool
//!   calls, as OpenAI's message (non-streaming) or deltas (streaming).
//!
//! A parser never fails: output that is not a well-formed call is plain content. Streaming, a
//! call is announced once its name is known and its arguments have begun (then the arguments go
//! out piece by piece); output that ends inside an announced call leaves it with the arguments it
//! got. Non-streaming, any malformed call makes the whole answer content, as in vLLM.

pub mod deepseek_v3;
pub mod forced;
pub mod hermes;
pub mod json;
pub mod llama3_json;
pub mod messages;
pub mod output;
pub mod request;
pub mod schema;

use serde::{Deserialize, Serialize};

/// What a tool-call parser makes of the model's output, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolEvent {
    /// Plain text: the message's `content`.
    Text(String),
    /// A new call (numbered from 0 in order) of the function `name`.
    Begin { name: String },
    /// The next piece of the current call's arguments (JSON text).
    Arguments(String),
}

/// An incremental tool-call parser for one choice.
pub trait ToolCallParser: Send {
    /// Takes the next piece of output; text that may still turn out to be markup is held back.
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>);
    /// The output ended: whatever was held back is decided.
    fn finish(&mut self, out: &mut Vec<ToolEvent>);
    /// After [`ToolCallParser::finish`]: whether every call was well formed.
    fn well_formed(&self) -> bool;
}

/// The tool-call parsers a model can be configured with (vLLM's `--tool-call-parser` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolParserKind {
    /// Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, `;`-separated.
    Llama3Json,
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5).
    Hermes,
    /// DeepSeek's tool-call tokens (DeepSeek-V3, the R1 distills' chat template).
    DeepseekV3,
}

/// Every parser with the name users type.
pub const PARSERS: [(&str, ToolParserKind); 3] = [
    ("llama3_json", ToolParserKind::Llama3Json),
    ("hermes", ToolParserKind::Hermes),
    ("deepseek_v3", ToolParserKind::DeepseekV3),
];

impl std::str::FromStr for ToolParserKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        PARSERS.iter().find(|(name, _)| *name == s).map(|(_, kind)| *kind).ok_or_else(|| {
            let known: Vec<&str> = PARSERS.iter().map(|(name, _)| *name).collect();
            format!("unknown tool call parser `{s}` (known: {})", known.join(", "))
        })
    }
}

impl ToolParserKind {
    /// A fresh parser for one choice.
    pub fn parser(self) -> Box<dyn ToolCallParser> {
        match self {
            ToolParserKind::Llama3Json => Box::new(llama3_json::parser()),
            ToolParserKind::Hermes => Box::new(hermes::Hermes::default()),
            ToolParserKind::DeepseekV3 => Box::new(deepseek_v3::DeepseekV3::default()),
        }
    }

    /// Whether the format's markers are special tokens that must stay in the text (as vLLM's
    /// parsers ask: `skip_special_tokens` false). Llama's `<|python_tag|>` may go: its calls
    /// are recognised without it.
    pub fn keeps_special_tokens(self) -> bool {
        !matches!(self, ToolParserKind::Llama3Json)
    }
}

/// A model's tool-calling settings (vLLM's `--enable-auto-tool-choice`, `--tool-call-parser`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToolSettings {
    pub enable_auto_tool_choice: bool,
    pub tool_call_parser: Option<ToolParserKind>,
}

impl ToolSettings {
    /// The parser of `tool_choice: "auto"`, when both settings allow it.
    pub fn auto_parser(&self) -> Option<ToolParserKind> {
        self.tool_call_parser.filter(|_| self.enable_auto_tool_choice)
    }
}

/// Pushes `text` as a [`ToolEvent::Text`] unless it is empty.
fn text(out: &mut Vec<ToolEvent>, text: &str) {
    if !text.is_empty() {
        out.push(ToolEvent::Text(text.to_string()));
    }
}

/// What comes after whitespace at the start of `rest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// `tag`, which ends at this byte.
    Tag(usize),
    /// Nothing but whitespace, or the start of `tag`: hold `rest` back.
    Undecided,
    /// Something else, from this byte.
    Other(usize),
}

fn next_tag(rest: &str, tag: &str) -> Next {
    let trimmed = rest.trim_start();
    let at = rest.len() - trimmed.len();
    if trimmed.starts_with(tag) {
        Next::Tag(at + tag.len())
    } else if tag.starts_with(trimmed) {
        Next::Undecided
    } else {
        Next::Other(at)
    }
}

/// Content of `buf` up to `tag`, whitespace right before the tag dropped (so an answer that is
/// only calls has no content). `Ok((lead, end))`: the tag ends at `end`, and `lead` is the
/// whitespace and tag not emitted (content again if what follows is no call). `Err(from)`: no
/// tag yet, and `buf[from..]` is held back (the start of a tag, or whitespace that may precede
/// one).
fn content_until(out: &mut Vec<ToolEvent>, buf: &str, tag: &str) -> Result<(String, usize), usize> {
    match buf.find(tag) {
        Some(i) => {
            let keep = buf[..i].trim_end().len();
            text(out, &buf[..keep]);
            Ok((buf[keep..i + tag.len()].to_string(), i + tag.len()))
        }
        None => {
            let cut = buf.len() - crate::api::chat::reasoning::partial_tag_suffix(buf, tag);
            let keep = buf[..cut].trim_end().len();
            text(out, &buf[..keep]);
            Err(keep)
        }
    }
}

/// A call as the tests write it: (name, arguments).
#[cfg(test)]
pub(crate) fn call(name: &str, arguments: &str) -> (String, String) {
    (name.to_string(), arguments.to_string())
}

/// Runs `parser` over `pieces` and merges its events: (content, calls as (name, arguments)).
#[cfg(test)]
pub(crate) fn run_pieces(parser: &mut dyn ToolCallParser, pieces: &[&str]) -> (String, Vec<(String, String)>) {
    let mut events = Vec::new();
    for piece in pieces {
        parser.push(piece, &mut events);
    }
    parser.finish(&mut events);
    let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
    for event in events {
        match event {
            ToolEvent::Text(t) => content.push_str(&t),
            ToolEvent::Begin { name } => calls.push((name, String::new())),
            ToolEvent::Arguments(a) => calls.last_mut().expect("arguments after a begin").1.push_str(&a),
        }
    }
    (content, calls)
}

/// Checks that every way of cutting `text` in two or three pieces gives the same events as
/// one piece, and returns that result with whether the output was well formed.
#[cfg(test)]
pub(crate) fn every_split<P: ToolCallParser>(
    make: impl Fn() -> P,
    text: &str,
) -> ((String, Vec<(String, String)>), bool) {
    let mut whole = make();
    let want = run_pieces(&mut whole, &[text]);
    let well_formed = whole.well_formed();
    let bounds: Vec<usize> = (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect();
    for &i in &bounds {
        let mut p = make();
        assert_eq!(run_pieces(&mut p, &[&text[..i], &text[i..]]), want, "{text:?} cut at {i}");
        assert_eq!(p.well_formed(), well_formed, "{text:?} cut at {i}");
        for &j in bounds.iter().filter(|&&j| j > i).step_by(3) {
            let mut p = make();
            let got = run_pieces(&mut p, &[&text[..i], &text[i..j], &text[j..]]);
            assert_eq!(got, want, "{text:?} cut at {i}, {j}");
        }
    }
    let mut p = make();
    let bytes: Vec<&str> = {
        let mut cuts = vec![0];
        cuts.extend(bounds.iter().copied());
        cuts.push(text.len());
        cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    };
    assert_eq!(run_pieces(&mut p, &bytes), want, "{text:?} one character at a time");
    (want, well_formed)
}
