//! Incremental JSON for tool calls: [`ValueScan`] finds where one JSON value ends in text that
//! arrives in pieces, and [`CallObject`] streams one `{"name": ..., "arguments": {...}}` object
//! (`parameters` is read as `arguments`, as Llama 3 names them) as tool-call events.
//!
//! Invariants:
//! - Scanning only tracks nesting and strings; structural characters are ASCII, so byte offsets
//!   found are always on `char` boundaries. A finished object is parsed with serde_json to decide
//!   whether it was well formed ([`CallObject::well_formed`]).
//! - A call begins ([`ToolEvent::Begin`]) only once its name is known and its arguments have
//!   started, so text that merely opens like a call is never announced as one; from then on each
//!   piece of the arguments goes out as it arrives, exactly as the model wrote it.
//! - When the arguments come before the name (or the object's head grows past [`HEAD_LIMIT`]),
//!   the object is held whole and announced at its end (arguments re-serialized compactly).
//! - Whatever is split where, the events' concatenation is the same (tested at every split).

use serde_json::Value;

use super::ToolEvent;

/// Bytes of an object's head (before its arguments) re-read on each piece before it is instead
/// held whole: bounds the work on output that opens like a call but is some other JSON.
pub const HEAD_LIMIT: usize = 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ScanState {
    #[default]
    Start,
    /// Inside an object or array, `depth` levels deep.
    Compound,
    /// A top-level string.
    Text,
    /// A number or a literal (`true`, `false`, `null`).
    Scalar,
    Done,
}

/// Where one JSON value ends, fed piece by piece. It must be fed from the value's first
/// character (no leading whitespace).
#[derive(Clone, Debug, Default)]
pub struct ValueScan {
    state: ScanState,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

/// What [`ValueScan::feed`] found in a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The value goes on past this piece.
    More,
    /// The value ends after this many bytes of the piece.
    End(usize),
    /// The piece does not start a JSON value.
    Invalid,
}

impl ValueScan {
    /// A scan that starts inside an object (after `{`): it ends at the object's closing brace.
    pub fn inside_object() -> Self {
        ValueScan { state: ScanState::Compound, depth: 1, ..ValueScan::default() }
    }

    /// Feeds the next piece of the value.
    pub fn feed(&mut self, piece: &str) -> Scan {
        for (i, b) in piece.bytes().enumerate() {
            match self.state {
                ScanState::Done => return Scan::End(i),
                ScanState::Start => {
                    self.state = match b {
                        b'{' | b'[' => {
                            self.depth = 1;
                            ScanState::Compound
                        }
                        b'"' => ScanState::Text,
                        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => ScanState::Scalar,
                        _ => return Scan::Invalid,
                    }
                }
                ScanState::Text | ScanState::Compound if self.escaped => self.escaped = false,
                ScanState::Text => match b {
                    b'\\' => self.escaped = true,
                    b'"' => return self.done(i + 1),
                    _ => {}
                },
                ScanState::Compound if self.in_string => match b {
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                },
                ScanState::Compound => match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return self.done(i + 1);
                        }
                    }
                    _ => {}
                },
                ScanState::Scalar => {
                    if !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) {
                        return self.done(i);
                    }
                }
            }
        }
        Scan::More
    }

    fn done(&mut self, at: usize) -> Scan {
        self.state = ScanState::Done;
        Scan::End(at)
    }
}

/// The first index at or after `i` that is not JSON whitespace.
pub fn skip_ws(text: &str, mut i: usize) -> usize {
    let bytes = text.as_bytes();
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end (exclusive) of the JSON string starting at `i` (a `"`), if it is complete.
fn string_end(text: &str, i: usize) -> Option<usize> {
    let mut scan = ValueScan::default();
    match scan.feed(&text[i..]) {
        Scan::End(n) => Some(i + n),
        Scan::More | Scan::Invalid => None,
    }
}

/// What the head of a call object (the text before its arguments) says so far.
#[derive(Debug, PartialEq)]
enum Head {
    /// Not enough text to tell.
    Need,
    /// The name is known and the arguments' value starts at this byte.
    Arguments {
        name: String,
        at: usize,
    },
    /// The object closed (at this end) with a name and no arguments: they are `{}`.
    NoArguments {
        name: String,
        end: usize,
    },
    /// The arguments come before the name: hold the object whole.
    ArgumentsFirst,
    NotACall,
}

/// Reads the head of `raw`, an object's text from its `{` on (whitespace before it allowed).
fn read_head(raw: &str) -> Head {
    let bytes = raw.as_bytes();
    let mut i = skip_ws(raw, 0);
    match bytes.get(i) {
        None => return Head::Need,
        Some(b'{') => i += 1,
        Some(_) => return Head::NotACall,
    }
    let mut name: Option<String> = None;
    loop {
        i = skip_ws(raw, i);
        match bytes.get(i) {
            None => return Head::Need,
            Some(b'}') => {
                return match name {
                    Some(name) => Head::NoArguments { name, end: i + 1 },
                    None => Head::NotACall,
                };
            }
            Some(b'"') => {}
            Some(_) => return Head::NotACall,
        }
        let Some(key_end) = string_end(raw, i) else { return Head::Need };
        let Ok(key) = serde_json::from_str::<String>(&raw[i..key_end]) else { return Head::NotACall };
        i = skip_ws(raw, key_end);
        match bytes.get(i) {
            None => return Head::Need,
            Some(b':') => i = skip_ws(raw, i + 1),
            Some(_) => return Head::NotACall,
        }
        if i >= bytes.len() {
            return Head::Need;
        }
        match key.as_str() {
            "arguments" | "parameters" => {
                return match name {
                    Some(name) => Head::Arguments { name, at: i },
                    None => Head::ArgumentsFirst,
                };
            }
            "name" => {
                if bytes[i] != b'"' {
                    return Head::NotACall;
                }
                let Some(end) = string_end(raw, i) else { return Head::Need };
                let Ok(value) = serde_json::from_str::<String>(&raw[i..end]) else { return Head::NotACall };
                name = Some(value);
                i = end;
            }
            _ => match ValueScan::default().feed(&raw[i..]) {
                Scan::End(n) => i += n,
                Scan::More => return Head::Need,
                Scan::Invalid => return Head::NotACall,
            },
        }
        i = skip_ws(raw, i);
        match bytes.get(i) {
            None => return Head::Need,
            Some(b',') => i += 1,
            Some(b'}') => {}
            Some(_) => return Head::NotACall,
        }
    }
}

#[derive(Debug)]
enum Stage {
    Head,
    /// Streaming the arguments' value.
    Arguments(ValueScan),
    /// After the arguments, up to the object's closing brace.
    Tail(ValueScan),
    /// Held whole until its end.
    Held(ValueScan),
    Ended,
    NotACall,
}

/// What [`CallObject::push`] did with a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The whole piece belongs to the object, which goes on.
    More,
    /// The object ended; the piece's text from `rest` on follows it.
    Ended { rest: usize },
    /// It is not a call: its text so far is plain text ([`OpenedCall`] emits it), and so is
    /// the piece from `rest` on.
    NotACall { rest: usize },
}

/// One call object, streamed (see the module docs).
#[derive(Debug)]
pub struct CallObject {
    /// The object's text so far (from its first byte, leading whitespace included).
    raw: String,
    stage: Stage,
    /// Whether [`ToolEvent::Begin`] went out.
    begun: bool,
    well_formed: bool,
}

impl Default for CallObject {
    fn default() -> Self {
        CallObject { raw: String::new(), stage: Stage::Head, begun: false, well_formed: false }
    }
}

impl CallObject {
    /// Takes the next piece of output.
    pub fn push(&mut self, piece: &str, out: &mut Vec<ToolEvent>) -> Progress {
        let base = self.raw.len();
        self.raw.push_str(piece);
        let from = if matches!(self.stage, Stage::Head) { 0 } else { base };
        match self.advance(from, out) {
            None if matches!(self.stage, Stage::NotACall) => Progress::NotACall { rest: piece.len() },
            None => Progress::More,
            Some(end) => {
                self.raw.truncate(end);
                // The end is never in text of earlier pieces (they would have found it).
                let rest = end.saturating_sub(base);
                if matches!(self.stage, Stage::NotACall) {
                    Progress::NotACall { rest }
                } else {
                    Progress::Ended { rest }
                }
            }
        }
    }

    /// The output ended inside the object. Returns `true` if it was never announced as a call
    /// (its text is then plain text); a call already begun stays, with the arguments it got,
    /// and is not well formed.
    pub fn finish(&mut self) -> bool {
        let never_begun = !self.begun;
        self.stage = if never_begun { Stage::NotACall } else { Stage::Ended };
        never_begun
    }

    /// Whether the object ended as a well-formed call.
    pub fn well_formed(&self) -> bool {
        self.well_formed
    }

    /// Runs the stages over `raw[from..]`; the object's end, if reached.
    fn advance(&mut self, mut from: usize, out: &mut Vec<ToolEvent>) -> Option<usize> {
        loop {
            match &mut self.stage {
                Stage::Head => match read_head(&self.raw) {
                    Head::Need if self.raw.len() <= HEAD_LIMIT => return None,
                    Head::Need | Head::ArgumentsFirst => {
                        self.stage = Stage::Held(ValueScan::default());
                        from = skip_ws(&self.raw, 0);
                    }
                    Head::NotACall => {
                        self.stage = Stage::NotACall;
                        return None;
                    }
                    Head::NoArguments { name, end } => {
                        out.push(ToolEvent::Begin { name });
                        out.push(ToolEvent::Arguments("{}".into()));
                        self.begun = true;
                        return Some(self.end(end));
                    }
                    Head::Arguments { name, at } => {
                        out.push(ToolEvent::Begin { name });
                        self.begun = true;
                        self.stage = Stage::Arguments(ValueScan::default());
                        from = at;
                    }
                },
                Stage::Arguments(scan) => match scan.feed(&self.raw[from..]) {
                    Scan::More => {
                        push_arguments(out, &self.raw[from..]);
                        return None;
                    }
                    Scan::End(n) => {
                        push_arguments(out, &self.raw[from..from + n]);
                        self.stage = Stage::Tail(ValueScan::inside_object());
                        from += n;
                    }
                    Scan::Invalid => {
                        // A call whose arguments are no JSON value: it ends here, malformed.
                        self.stage = Stage::Ended;
                        return Some(from);
                    }
                },
                Stage::Tail(scan) => match scan.feed(&self.raw[from..]) {
                    Scan::End(n) => return Some(self.end(from + n)),
                    // A scan inside an object never meets a value's start, so never `Invalid`.
                    Scan::More | Scan::Invalid => return None,
                },
                Stage::Held(scan) => match scan.feed(&self.raw[from..]) {
                    Scan::More => return None,
                    Scan::End(n) => return Some(self.release(from + n, out)),
                    Scan::Invalid => {
                        self.stage = Stage::NotACall;
                        return None;
                    }
                },
                Stage::Ended | Stage::NotACall => return None,
            }
        }
    }

    /// The object ended at `end`: checks it.
    fn end(&mut self, end: usize) -> usize {
        self.stage = Stage::Ended;
        self.well_formed = serde_json::from_str::<Value>(&self.raw[..end]).is_ok_and(|v| v.is_object());
        end
    }

    /// A held object ended at `end`: announces it if it is a call.
    fn release(&mut self, end: usize, out: &mut Vec<ToolEvent>) -> usize {
        let call = serde_json::from_str::<Value>(&self.raw[..end]).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_string();
            let arguments = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(Value::Null);
            let arguments = if arguments.is_null() { "{}".to_string() } else { arguments.to_string() };
            Some((name, arguments))
        });
        match call {
            Some((name, arguments)) => {
                out.push(ToolEvent::Begin { name });
                out.push(ToolEvent::Arguments(arguments));
                self.begun = true;
                self.stage = Stage::Ended;
                self.well_formed = true;
            }
            None => self.stage = Stage::NotACall,
        }
        end
    }
}

fn push_arguments(out: &mut Vec<ToolEvent>, text: &str) {
    if !text.is_empty() {
        out.push(ToolEvent::Arguments(text.to_string()));
    }
}

/// What [`OpenedCall::push`] did with a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    More,
    /// The call ended; the piece's text from `rest` on follows it.
    Ended {
        rest: usize,
        well_formed: bool,
    },
    /// It was no call: its markup and text went out as plain text; the piece from `rest` on
    /// is for the caller.
    NotACall {
        rest: usize,
    },
}

/// A call object with the markup that opened it (`<tool_call>`, whitespace, a separator), which
/// is plain text again if the object turns out to be no call.
#[derive(Debug, Default)]
pub struct OpenedCall {
    call: CallObject,
    lead: String,
}

impl OpenedCall {
    pub fn new(lead: impl Into<String>) -> Self {
        OpenedCall { call: CallObject::default(), lead: lead.into() }
    }

    /// Takes the next piece (see [`Step`]).
    pub fn push(&mut self, piece: &str, out: &mut Vec<ToolEvent>) -> Step {
        match self.call.push(piece, out) {
            Progress::More => Step::More,
            Progress::Ended { rest } => Step::Ended { rest, well_formed: self.call.well_formed() },
            Progress::NotACall { rest } => {
                self.release(out);
                Step::NotACall { rest }
            }
        }
    }

    /// The output ended inside the call: text if it was never announced (see
    /// [`CallObject::finish`]).
    pub fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        if self.call.finish() {
            self.release(out);
        }
    }

    fn release(&mut self, out: &mut Vec<ToolEvent>) {
        super::text(out, &std::mem::take(&mut self.lead));
        super::text(out, &std::mem::take(&mut self.call.raw));
    }
}
