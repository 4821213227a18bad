//! A byte-level matcher for the JSON documents a [`Grammar`] allows: fed the output byte by
//! byte, it says whether the text so far can still become a valid document, and whether it
//! is one already.
//!
//! It is a pushdown automaton kept as a set of threads, each a stack of frames (the value
//! being written, inside the containers around it). Choices the next byte has not settled
//! yet (which branch of an `anyOf`, which optional property comes next) are separate threads
//! until it does. Whitespace is allowed where JSON allows it, at most [`MAX_WHITESPACE`]
//! bytes in a row, so a model cannot stall in it.

use std::sync::Arc;

use super::schema::{Grammar, Node, NodeId};

/// Whitespace bytes allowed in one gap between tokens of the document.
pub const MAX_WHITESPACE: u8 = 16;
/// Digits allowed in a number's integer and fraction parts (each), and in its exponent (two,
/// so every number fits an f64).
const MAX_DIGITS: u8 = 16;
const MAX_EXPONENT_DIGITS: u8 = 2;
/// Threads kept at most: a safety valve. Threads fork once per alternative of a flattened
/// choice or per candidate property, both bounded by the grammar's size, so only schemas
/// whose branches stay ambiguous over many nested forks reach it (the later ones are cut).
const MAX_THREADS: usize = 4096;

/// Where a number is in `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

/// Inside a string: after a backslash, in a `\uXXXX` (hex digits seen, their value so far),
/// or waiting for the `\uDC00`–`\uDFFF` that must follow a high surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Escape {
    None,
    Backslash,
    Unicode(u8, u16),
    LowBackslash,
    LowU,
    LowUnicode(u8, u16),
}

/// Where an object or array is between its brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Container {
    /// After `{` or `[`.
    Open,
    /// Writing the key of property `prop` (objects with properties), `at` bytes of it done.
    Key { prop: usize, at: usize },
    /// After a key, before `:`.
    AfterKey,
    /// A value is being written (the frame above); for objects with properties, of `prop`.
    InValue,
    /// After a value, before `,` or the closing bracket.
    AfterValue,
    /// After `,`.
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Frame {
    /// A value of this node comes next.
    Value(NodeId),
    /// Bytes of a fixed text: a literal node's, or `true`/`false`/`null` (node `None`).
    Literal {
        node: Option<NodeId>,
        text: &'static [u8],
        at: usize,
    },
    String {
        min_chars: usize,
        max_chars: Option<usize>,
        chars: usize,
        escape: Escape,
        /// UTF-8 continuation bytes still due, and the range the next one must be in.
        utf8_left: u8,
        utf8_next: (u8, u8),
        /// A [`Node::Map`]'s key rather than a value.
        key: bool,
    },
    Number {
        state: Num,
        integer: bool,
        digits: u8,
    },
    Array {
        node: NodeId,
        state: Container,
        count: usize,
    },
    /// An [`Node::Object`]: `next` is the first property that may still come.
    Object {
        node: NodeId,
        state: Container,
        next: usize,
        /// The property whose value is being written.
        current: usize,
    },
    Map {
        node: NodeId,
        state: Container,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Thread {
    stack: Vec<Frame>,
    /// Whitespace bytes in the current gap.
    whitespace: u8,
}

/// The matcher's state after the bytes fed so far.
#[derive(Debug, Clone)]
pub struct JsonMatcher {
    grammar: Arc<Grammar>,
    threads: Vec<Thread>,
}

fn is_ws(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonMatcher {
    /// A matcher at the start of a document.
    pub fn new(grammar: Arc<Grammar>) -> Self {
        let root = grammar.root;
        JsonMatcher {
            grammar,
            threads: vec![Thread {
                stack: vec![Frame::Value(root)],
                whitespace: 0,
            }],
        }
    }

    /// Whether the bytes so far can still become a document (false once a byte was refused).
    pub fn alive(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Whether the bytes so far are a whole document.
    pub fn complete(&self) -> bool {
        self.threads.iter().any(|t| match t.stack.as_slice() {
            [] => true,
            [Frame::Number { state, .. }] => state.complete(),
            _ => false,
        })
    }

    /// Whether the document is whole and nothing more can follow (generation can end
    /// without waiting for an end-of-generation token).
    pub fn finished(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| t.stack.is_empty())
    }

    /// Feeds `bytes`; returns false (and is dead) if the document cannot continue so.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes
            .iter()
            .all(|&byte| feed_byte(&self.grammar, &mut self.threads, byte))
    }

    /// Inside a string, with no escape or UTF-8 sequence open, on the only thread: how many
    /// more characters the string may hold (`None` elsewhere). Text without quotes,
    /// backslashes or control bytes that is whole UTF-8 continues such a string as long as
    /// it has room, which lets the token mask skip feeding most of the vocabulary.
    pub fn plain_string_room(&self) -> Option<usize> {
        match self.threads.as_slice() {
            [thread] => match thread.stack.last() {
                Some(Frame::String {
                    max_chars,
                    chars,
                    escape: Escape::None,
                    utf8_left: 0,
                    ..
                }) => Some(max_chars.map_or(usize::MAX, |max| max.saturating_sub(*chars))),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether `bytes` could come next, without changing the state.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut threads = self.threads.clone();
        bytes
            .iter()
            .all(|&byte| feed_byte(&self.grammar, &mut threads, byte))
    }
}

/// Moves every thread on by `byte`; false when none takes it.
fn feed_byte(grammar: &Grammar, threads: &mut Vec<Thread>, byte: u8) -> bool {
    let mut next = Vec::with_capacity(threads.len());
    for thread in threads.drain(..) {
        step(grammar, thread, byte, &mut next);
    }
    if next.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(next.len());
        next.retain(|t| seen.insert(t.clone()));
    }
    next.truncate(MAX_THREADS);
    *threads = next;
    !threads.is_empty()
}

/// Advances `thread` by `byte`, pushing every thread that accepts it onto `out`.
fn step(grammar: &Grammar, mut thread: Thread, byte: u8, out: &mut Vec<Thread>) {
    let Some(top) = thread.stack.last().copied() else {
        return; // a finished document takes nothing more
    };
    // Whitespace between the document's tokens: before a value, and inside containers
    // around their brackets, commas and colons.
    let gap = match &top {
        Frame::Value(_) => true,
        Frame::Array { state, .. } | Frame::Object { state, .. } | Frame::Map { state, .. } => {
            matches!(
                state,
                Container::Open | Container::AfterKey | Container::AfterValue | Container::Comma
            )
        }
        _ => false,
    };
    if is_ws(byte) && gap {
        if thread.whitespace < MAX_WHITESPACE {
            thread.whitespace += 1;
            out.push(thread);
        }
        return;
    }
    if !is_ws(byte) {
        thread.whitespace = 0;
    }
    match top {
        Frame::Value(node) => {
            thread.stack.pop();
            start_value(grammar, thread, node, byte, out);
        }
        Frame::Literal { node, text, at } => {
            let text: &[u8] = match node {
                Some(n) => match &grammar.nodes[n] {
                    Node::Literal(bytes) => bytes,
                    _ => return,
                },
                None => text,
            };
            if text.get(at) != Some(&byte) {
                return;
            }
            if at + 1 == text.len() {
                thread.stack.pop();
                value_done(thread, out);
            } else {
                if let Some(Frame::Literal { at, .. }) = thread.stack.last_mut() {
                    *at += 1;
                }
                out.push(thread);
            }
        }
        Frame::String {
            min_chars,
            max_chars,
            chars,
            escape,
            utf8_left,
            utf8_next,
            key,
        } => {
            let mut s = (chars, escape, utf8_left, (0x80u8, 0xBFu8));
            let room = |n: usize| max_chars.is_none_or(|max| n < max);
            match (escape, utf8_left) {
                (Escape::Backslash, _) => match byte {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => s.1 = Escape::None,
                    b'u' => s.1 = Escape::Unicode(0, 0),
                    _ => return,
                },
                (Escape::Unicode(n, value), _) => {
                    let Some(value) = push_hex(value, byte) else {
                        return;
                    };
                    // A lone low surrogate (DC00–DFFF) is refused as soon as it shows.
                    if n == 1 && (0xDC..=0xDF).contains(&value) {
                        return;
                    }
                    s.1 = match n {
                        3 if (0xD800..=0xDBFF).contains(&value) => Escape::LowBackslash,
                        3 => Escape::None,
                        _ => Escape::Unicode(n + 1, value),
                    };
                }
                // A surrogate pair is one character, counted at its first backslash.
                (Escape::LowBackslash, _) => {
                    if byte != b'\\' {
                        return;
                    }
                    s.1 = Escape::LowU;
                }
                (Escape::LowU, _) => {
                    if byte != b'u' {
                        return;
                    }
                    s.1 = Escape::LowUnicode(0, 0);
                }
                (Escape::LowUnicode(n, value), _) => {
                    let Some(value) = push_hex(value, byte) else {
                        return;
                    };
                    let fits = match n {
                        0 => value == 0xD,
                        1 => (0xDC..=0xDF).contains(&value),
                        _ => true,
                    };
                    if !fits {
                        return;
                    }
                    s.1 = if n == 3 {
                        Escape::None
                    } else {
                        Escape::LowUnicode(n + 1, value)
                    };
                }
                (Escape::None, left) if left > 0 => {
                    if !(utf8_next.0..=utf8_next.1).contains(&byte) {
                        return;
                    }
                    s.2 = left - 1;
                }
                (Escape::None, _) => match byte {
                    b'"' => {
                        if chars < min_chars {
                            return;
                        }
                        thread.stack.pop();
                        if key {
                            if let Some(Frame::Map { state, .. }) = thread.stack.last_mut() {
                                *state = Container::AfterKey;
                            }
                            out.push(thread);
                        } else {
                            value_done(thread, out);
                        }
                        return;
                    }
                    0x00..=0x1F => return,
                    b'\\' => {
                        if !room(chars) {
                            return;
                        }
                        s.0 = chars + 1;
                        s.1 = Escape::Backslash;
                    }
                    0x20..=0x7F => {
                        if !room(chars) {
                            return;
                        }
                        s.0 = chars + 1;
                    }
                    // A UTF-8 lead byte: the continuation count, and the range of the first
                    // continuation that rules out overlong forms, surrogates and code
                    // points beyond U+10FFFF (C0, C1 and F5+ never lead).
                    0xC2..=0xF4 => {
                        if !room(chars) {
                            return;
                        }
                        s.0 = chars + 1;
                        (s.2, s.3) = match byte {
                            0xC2..=0xDF => (1, (0x80, 0xBF)),
                            0xE0 => (2, (0xA0, 0xBF)),
                            0xED => (2, (0x80, 0x9F)),
                            0xE1..=0xEF => (2, (0x80, 0xBF)),
                            0xF0 => (3, (0x90, 0xBF)),
                            0xF4 => (3, (0x80, 0x8F)),
                            _ => (3, (0x80, 0xBF)),
                        };
                    }
                    _ => return,
                },
            }
            set_top(
                &mut thread,
                Frame::String {
                    min_chars,
                    max_chars,
                    chars: s.0,
                    escape: s.1,
                    utf8_left: s.2,
                    utf8_next: s.3,
                    key,
                },
            );
            out.push(thread);
        }
        Frame::Number {
            state,
            integer,
            digits,
        } => {
            let digit = byte.is_ascii_digit();
            let next = match (state, byte) {
                (Num::Minus, b'0') => Some((Num::Zero, 1)),
                (Num::Minus, _) if digit => Some((Num::Int, 1)),
                (Num::Int, _) if digit && digits < MAX_DIGITS => Some((Num::Int, digits + 1)),
                (Num::Zero | Num::Int, b'.') if !integer => Some((Num::Dot, 0)),
                (Num::Dot, _) if digit => Some((Num::Frac, 1)),
                (Num::Frac, _) if digit && digits < MAX_DIGITS => Some((Num::Frac, digits + 1)),
                (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !integer => Some((Num::Exp, 0)),
                (Num::Exp, b'+' | b'-') => Some((Num::ExpSign, 0)),
                (Num::Exp | Num::ExpSign, _) if digit => Some((Num::ExpDigits, 1)),
                (Num::ExpDigits, _) if digit && digits < MAX_EXPONENT_DIGITS => {
                    Some((Num::ExpDigits, digits + 1))
                }
                _ => None,
            };
            match next {
                Some((state, digits)) => {
                    set_top(
                        &mut thread,
                        Frame::Number {
                            state,
                            integer,
                            digits,
                        },
                    );
                    out.push(thread);
                }
                None if state.complete() => {
                    // The byte ends the number and belongs to what encloses it.
                    thread.stack.pop();
                    if thread.stack.is_empty() {
                        return;
                    }
                    let mut after = Vec::new();
                    value_done(thread, &mut after);
                    for t in after {
                        step(grammar, t, byte, out);
                    }
                }
                None => {}
            }
        }
        Frame::Array { node, state, count } => {
            let Node::Array {
                items,
                min_items,
                max_items,
            } = grammar.nodes[node]
            else {
                return;
            };
            let more = max_items.is_none_or(|max| count < max);
            match (state, byte) {
                (Container::Open | Container::AfterValue, b']') if count >= min_items => {
                    thread.stack.pop();
                    value_done(thread, out);
                }
                (Container::AfterValue, b',') if more => {
                    set_top(
                        &mut thread,
                        Frame::Array {
                            node,
                            state: Container::Comma,
                            count,
                        },
                    );
                    out.push(thread);
                }
                (Container::Open | Container::Comma, _) if more => {
                    set_top(
                        &mut thread,
                        Frame::Array {
                            node,
                            state: Container::InValue,
                            count,
                        },
                    );
                    start_value(grammar, thread, items, byte, out);
                }
                _ => {}
            }
        }
        Frame::Object {
            node,
            state,
            next,
            current,
        } => {
            let Node::Object { properties } = &grammar.nodes[node] else {
                return;
            };
            // Properties that may come next: up to and including the first required one.
            let candidates = || {
                let end = properties[next..]
                    .iter()
                    .position(|p| p.required)
                    .map_or(properties.len(), |i| next + i + 1);
                next..end
            };
            let may_close = !properties[next..].iter().any(|p| p.required);
            let object = |state, next, current| Frame::Object {
                node,
                state,
                next,
                current,
            };
            match (state, byte) {
                (Container::Open | Container::AfterValue, b'}') if may_close => {
                    thread.stack.pop();
                    value_done(thread, out);
                }
                (Container::AfterValue, b',') if !candidates().is_empty() => {
                    set_top(&mut thread, object(Container::Comma, next, current));
                    out.push(thread);
                }
                (Container::Open | Container::Comma, b'"') => {
                    for prop in candidates() {
                        let mut t = thread.clone();
                        set_top(
                            &mut t,
                            object(Container::Key { prop, at: 1 }, next, current),
                        );
                        out.push(t);
                    }
                }
                (Container::Key { prop, at }, _) => {
                    let key = &properties[prop].key_json;
                    if key.get(at) != Some(&byte) {
                        return;
                    }
                    let state = if at + 1 == key.len() {
                        Container::AfterKey
                    } else {
                        Container::Key { prop, at: at + 1 }
                    };
                    let current = if state == Container::AfterKey {
                        prop
                    } else {
                        current
                    };
                    set_top(&mut thread, object(state, next, current));
                    out.push(thread);
                }
                (Container::AfterKey, b':') => {
                    let value = properties[current].value;
                    set_top(
                        &mut thread,
                        object(Container::InValue, current + 1, current),
                    );
                    thread.stack.push(Frame::Value(value));
                    out.push(thread);
                }
                _ => {}
            }
        }
        Frame::Map { node, state } => {
            let Node::Map { values } = grammar.nodes[node] else {
                return;
            };
            let map = |state| Frame::Map { node, state };
            match (state, byte) {
                (Container::Open | Container::AfterValue, b'}') => {
                    thread.stack.pop();
                    value_done(thread, out);
                }
                (Container::AfterValue, b',') => {
                    set_top(&mut thread, map(Container::Comma));
                    out.push(thread);
                }
                (Container::Open | Container::Comma, b'"') => {
                    set_top(&mut thread, map(Container::Key { prop: 0, at: 0 }));
                    thread.stack.push(Frame::String {
                        min_chars: 0,
                        max_chars: None,
                        chars: 0,
                        escape: Escape::None,
                        utf8_left: 0,
                        utf8_next: (0x80, 0xBF),
                        key: true,
                    });
                    out.push(thread);
                }
                (Container::AfterKey, b':') => {
                    set_top(&mut thread, map(Container::InValue));
                    thread.stack.push(Frame::Value(values));
                    out.push(thread);
                }
                _ => {}
            }
        }
    }
}

/// `value` with the hex digit `byte` appended (`None`: not a hex digit).
fn push_hex(value: u16, byte: u8) -> Option<u16> {
    let digit = (byte as char).to_digit(16)?;
    Some(value << 4 | digit as u16)
}

/// Begins a value of `node` with `byte` (not whitespace).
fn start_value(
    grammar: &Grammar,
    mut thread: Thread,
    node: NodeId,
    byte: u8,
    out: &mut Vec<Thread>,
) {
    let literal = |text: &'static [u8]| Frame::Literal {
        node: None,
        text,
        at: 0,
    };
    let frame = match &grammar.nodes[node] {
        Node::OneOf(alternatives) => {
            for &alt in alternatives {
                start_value(grammar, thread.clone(), alt, byte, out);
            }
            return;
        }
        Node::Null => literal(b"null"),
        Node::Boolean => match byte {
            b't' => literal(b"true"),
            _ => literal(b"false"),
        },
        Node::Literal(_) => Frame::Literal {
            node: Some(node),
            text: b"",
            at: 0,
        },
        Node::Integer | Node::Number => {
            let integer = matches!(grammar.nodes[node], Node::Integer);
            let state = match byte {
                b'-' => Num::Minus,
                b'0' => Num::Zero,
                b'1'..=b'9' => Num::Int,
                _ => return,
            };
            let digits = u8::from(state != Num::Minus);
            thread.stack.push(Frame::Number {
                state,
                integer,
                digits,
            });
            out.push(thread);
            return;
        }
        Node::String {
            min_chars,
            max_chars,
        } => {
            if byte != b'"' {
                return;
            }
            thread.stack.push(Frame::String {
                min_chars: *min_chars,
                max_chars: *max_chars,
                chars: 0,
                escape: Escape::None,
                utf8_left: 0,
                utf8_next: (0x80, 0xBF),
                key: false,
            });
            out.push(thread);
            return;
        }
        Node::Array { .. } => {
            if byte != b'[' {
                return;
            }
            thread.stack.push(Frame::Array {
                node,
                state: Container::Open,
                count: 0,
            });
            out.push(thread);
            return;
        }
        Node::Object { .. } => {
            if byte != b'{' {
                return;
            }
            thread.stack.push(Frame::Object {
                node,
                state: Container::Open,
                next: 0,
                current: 0,
            });
            out.push(thread);
            return;
        }
        Node::Map { .. } => {
            if byte != b'{' {
                return;
            }
            thread.stack.push(Frame::Map {
                node,
                state: Container::Open,
            });
            out.push(thread);
            return;
        }
    };
    // Literals: push, then let the literal frame take the first byte.
    thread.stack.push(frame);
    step(grammar, thread, byte, out);
}

/// The value on top of the stack is finished (and popped): its container moves on.
fn value_done(mut thread: Thread, out: &mut Vec<Thread>) {
    match thread.stack.last_mut() {
        None => {}
        Some(Frame::Array { state, count, .. }) => {
            *state = Container::AfterValue;
            *count += 1;
        }
        Some(Frame::Object { state, .. } | Frame::Map { state, .. }) => {
            *state = Container::AfterValue;
        }
        Some(_) => return, // values sit only in containers
    }
    out.push(thread);
}

fn set_top(thread: &mut Thread, frame: Frame) {
    if let Some(top) = thread.stack.last_mut() {
        *top = frame;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::sampler::Rng;

    fn grammar(schema: Value) -> Arc<Grammar> {
        Arc::new(Grammar::from_schema(&schema).expect("schema compiles"))
    }

    fn matches(grammar: &Arc<Grammar>, text: &str) -> bool {
        let mut m = JsonMatcher::new(grammar.clone());
        m.feed(text.as_bytes()) && m.complete()
    }

    fn person() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 8},
                "age": {"type": "integer"},
                "email": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
                "score": {"type": "number"},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "ok"],
            "additionalProperties": false
        })
    }

    #[test]
    fn documents_the_schema_allows_are_accepted() {
        let g = grammar(person());
        for text in [
            r#"{"name":"Ann","age":31,"ok":true}"#,
            "{ \"name\" : \"Bé\\n\\u00e9\" ,\n  \"age\": -0, \"email\": null, \"ok\": false }",
            r#"{"name":"x","age":7,"email":"a@b","tags":["a",3],"score":-1.5e+3,"ok":true}"#,
            r#"{"name":"12345678","age":0,"tags":[],"ok":false}"#,
            r#"{"name":"ü日本","age":10,"score":0.25,"ok":true}"#,
        ] {
            assert!(matches(&g, text), "{text}");
        }
    }

    #[test]
    fn documents_the_schema_forbids_are_refused_at_the_first_wrong_byte() {
        let g = grammar(person());
        for (prefix, refused) in [
            (r#"{"#, r#""age""#),                          // required "name" must come first
            (r#"{"name":"Ann","#, r#""ok""#),              // required "age" skipped
            (r#"{"name":"#, r#""""#),                      // minLength 1
            (r#"{"name":"12345678"#, "9"),                 // maxLength 8
            (r#"{"name":"a","age":1"#, "."),               // integer
            (r#"{"name":"a","age":0"#, "1"),               // leading zero
            (r#"{"name":"a","age":1,"tags":["#, r#""c""#), // not in the enum
            (r#"{"name":"a","age":1,"tags":[3,3"#, ","),   // maxItems 2
            (r#"{"name":"a","age":1,"ok":true"#, ",}"),    // trailing comma
            (r#"{"name":"a","age":1,"#, r#""x""#),         // unknown property
            ("{\"name\":\"a", "\t"),                       // raw control character
        ] {
            let mut m = JsonMatcher::new(g.clone());
            assert!(m.feed(prefix.as_bytes()), "{prefix}: refused");
            assert!(
                !m.accepts(refused.as_bytes()),
                "{prefix} + {refused}: accepted"
            );
        }
        // A whole document takes nothing more, and a prefix is not complete.
        let mut m = JsonMatcher::new(g.clone());
        assert!(m.feed(br#"{"name":"a","age":1,"ok":true"#));
        assert!(!m.complete());
        assert!(m.feed(b"}"));
        assert!(m.complete());
        assert!(!m.accepts(b" "));
    }

    #[test]
    fn numbers_end_where_their_container_goes_on() {
        let g = grammar(json!({"type": "array", "items": {"type": "number"}}));
        assert!(matches(&g, "[1,2.5e-3 ,-0.0,10]"));
        assert!(!matches(&g, "[1.]"));
        assert!(!matches(&g, "[-]"));
        let root = grammar(json!({"type": "integer"}));
        let mut m = JsonMatcher::new(root.clone());
        assert!(m.feed(b"42") && m.complete());
        assert!(m.accepts(b"7"));
        assert!(!m.accepts(b" "));
    }

    #[test]
    fn strings_hold_only_well_formed_utf8() {
        let g = grammar(json!({"type": "string", "maxLength": 2}));
        assert!(matches(&g, "\"日ü\""));
        assert!(!matches(&g, "\"日üx\"")); // three characters
        for bad in [
            &b"\"\xC0\x80"[..],    // overlong NUL
            b"\"\xE0\x80\x80",     // overlong
            b"\"\xED\xA0\x80",     // surrogate
            b"\"\xF4\x90\x80\x80", // beyond U+10FFFF
            b"\"\xF5",
            b"\"\x80",   // stray continuation
            b"\"\xC3\"", // cut short
        ] {
            assert!(!JsonMatcher::new(g.clone()).accepts(bad), "{bad:?}");
        }
        assert!(JsonMatcher::new(g.clone()).accepts(b"\"\xF0\x9F\x98\x80\""));
        // \u escapes: a surrogate pair is one character; lone surrogates are refused early.
        assert!(matches(&g, r#""\ud83d\ude00x""#));
        assert!(!matches(&g, r#""\ud83d\ude00xy""#));
        for bad in [
            r#""\ud83d""#,
            r#""\ud83dx"#,
            r#""\ud83d\u00"#,
            r#""\udc"#,
            r#""\uDE"#,
        ] {
            assert!(
                !JsonMatcher::new(g.clone()).accepts(bad.as_bytes()),
                "{bad}"
            );
        }
        assert!(JsonMatcher::new(g.clone()).accepts(br#""\uD83D\uDE"#));
    }

    #[test]
    fn whitespace_runs_are_bounded() {
        let g = grammar(json!({"type": "object"}));
        let ok = format!("{{{}}}", " ".repeat(MAX_WHITESPACE as usize));
        let too_long = format!("{{{}}}", " ".repeat(MAX_WHITESPACE as usize + 1));
        assert!(matches(&g, &ok));
        assert!(!matches(&g, &too_long));
    }

    #[test]
    fn recursive_references_and_free_objects() {
        let g = grammar(json!({
            "$ref": "#/$defs/node",
            "$defs": {"node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"]
            }}
        }));
        assert!(matches(
            &g,
            r#"{"v":1,"kids":[{"v":2},{"v":3,"kids":[{"v":4}]}]}"#
        ));
        assert!(!matches(&g, r#"{"v":1,"kids":[{"w":2}]}"#));
        let any = Arc::new(Grammar::any_object());
        assert!(matches(&any, r#"{"a":[1,{"b":null}],"c":"d","e":{}}"#));
        assert!(!matches(&any, "[1]"));
        assert!(!matches(&any, r#"{"a":}"#));
    }

    #[test]
    fn schemas_the_grammar_cannot_enforce_are_refused_by_name() {
        let err = Grammar::from_schema(&json!({
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0}}
        }))
        .unwrap_err();
        assert_eq!(err.path, "#/properties/age/minimum");
        assert!(err.message.contains("'minimum' is not supported"), "{err}");
        let err = Grammar::from_schema(&json!({"type": "object", "required": ["x"]})).unwrap_err();
        assert!(err.message.contains("'x'"), "{err}");
        let err = Grammar::from_schema(&json!({"type": "strng"})).unwrap_err();
        assert_eq!(err.path, "#/type");
        let err = Grammar::from_schema(&json!({"$ref": "#/$defs/missing"})).unwrap_err();
        assert!(err.message.contains("points at nothing"), "{err}");
        assert!(Grammar::from_schema(&json!(false)).is_err());
    }

    #[test]
    fn hostile_schemas_are_refused_or_stay_cheap() {
        // A $ref cycle with nothing in between would recurse forever.
        for schema in [
            json!({"$ref": "#"}),
            json!({"anyOf": [{"$ref": "#"}, {"$ref": "#"}]}),
            json!({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}),
        ] {
            let err = Grammar::from_schema(&schema).unwrap_err();
            assert!(err.message.contains("cycle"), "{schema}: {err}");
        }
        // A cycle beside a real branch keeps the branch.
        let g = grammar(json!({"anyOf": [{"$ref": "#"}, {"type": "null"}]}));
        assert!(matches(&g, "null"));
        // Shared $refs doubling 25 times (2^25 paths): flattened, one byte forks once per
        // value kind.
        let mut defs = serde_json::Map::new();
        defs.insert("d0".into(), json!({"type": "null"}));
        for i in 1..=25 {
            let prev = format!("#/$defs/d{}", i - 1);
            defs.insert(
                format!("d{i}"),
                json!({"anyOf": [{"$ref": prev}, {"$ref": prev}]}),
            );
        }
        let g = grammar(json!({"$defs": defs, "$ref": "#/$defs/d25"}));
        assert!(matches(&g, "null"));
        // Chains deeper than the limit are refused, not recursed into.
        let mut deep = json!({"type": "integer"});
        for _ in 0..200 {
            deep = json!({"type": "array", "items": deep});
        }
        let err = Grammar::from_schema(&deep).unwrap_err();
        assert!(err.message.contains("deeper"), "{err}");
        // Keywords beside a choice would be dropped: refused by name.
        for (schema, keyword) in [
            (
                json!({"type": "object", "properties": {"a": {}}, "anyOf": [{"required": ["a"]}]}),
                "type",
            ),
            (json!({"enum": ["ab", "c"], "maxLength": 1}), "maxLength"),
            (json!({"const": 1, "enum": [1]}), "enum"),
        ] {
            let err = Grammar::from_schema(&schema).unwrap_err();
            assert!(
                err.path.ends_with(keyword) || err.message.contains(keyword),
                "{schema}: {err}"
            );
        }
        // `type` beside `enum` filters it; beside `const` it must agree.
        let g = grammar(json!({"type": "string", "enum": ["a", 1, "b"]}));
        assert!(matches(&g, r#""b""#) && !matches(&g, "1"));
        assert!(Grammar::from_schema(&json!({"const": 1, "type": "string"})).is_err());
        // Untyped `required` / `minItems` imply their container.
        assert!(!matches(
            &grammar(json!({"required": ["x"], "properties": {"x": {}}})),
            "{}"
        ));
        assert!(!matches(&grammar(json!({"minItems": 2})), "[1]"));
        // Every one of 300 enum values stays reachable.
        let values: Vec<String> = (0..300).map(|i| format!("v{i:03}")).collect();
        let g = grammar(json!({"enum": values}));
        assert!(matches(&g, r#""v299""#) && matches(&g, r#""v000""#) && !matches(&g, r#""v300""#));
    }

    #[test]
    fn a_whole_document_is_finished_only_when_nothing_may_follow() {
        let g = grammar(json!({"type": "object"}));
        let mut m = JsonMatcher::new(g);
        assert!(m.feed(b"{}") && m.finished());
        let n = grammar(json!({"type": "number"}));
        let mut m = JsonMatcher::new(n);
        assert!(m.feed(b"12") && m.complete() && !m.finished());
    }

    /// Whether `value` is valid under `schema` (the keywords the grammar supports), checked
    /// on the parsed tree: an independent reference for the byte-level matcher.
    fn valid(schema: &Value, value: &Value, document: &Value) -> bool {
        let Some(map) = schema.as_object() else {
            return schema != &json!(false);
        };
        if let Some(r) = map.get("$ref").and_then(Value::as_str) {
            let target = document.pointer(r.trim_start_matches('#')).expect("ref");
            return valid(target, value, document);
        }
        if let Some(c) = map.get("const") {
            return c == value;
        }
        if let Some(e) = map.get("enum").and_then(Value::as_array) {
            return e.contains(value);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = map.get(key).and_then(Value::as_array) {
                return branches.iter().any(|b| valid(b, value, document));
            }
        }
        let types: Vec<&str> = match map.get("type") {
            Some(Value::String(t)) => vec![t],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec!["null", "boolean", "number", "string", "array", "object"],
        };
        // Type membership is JSON Schema's definition, shared with the compiler.
        if !types
            .iter()
            .any(|t| super::super::schema::has_type(value, t))
        {
            return false;
        }
        match value {
            Value::String(s) => {
                let n = s.chars().count() as u64;
                map.get("minLength")
                    .and_then(Value::as_u64)
                    .is_none_or(|m| n >= m)
                    && map
                        .get("maxLength")
                        .and_then(Value::as_u64)
                        .is_none_or(|m| n <= m)
            }
            Value::Array(items) => {
                let n = items.len() as u64;
                map.get("minItems")
                    .and_then(Value::as_u64)
                    .is_none_or(|m| n >= m)
                    && map
                        .get("maxItems")
                        .and_then(Value::as_u64)
                        .is_none_or(|m| n <= m)
                    && items
                        .iter()
                        .all(|i| map.get("items").is_none_or(|s| valid(s, i, document)))
            }
            Value::Object(fields) => {
                let props = map.get("properties").and_then(Value::as_object);
                let required = map.get("required").and_then(Value::as_array);
                required.is_none_or(|r| r.iter().all(|k| fields.contains_key(k.as_str().unwrap())))
                    && fields
                        .iter()
                        .all(|(k, v)| match props.and_then(|p| p.get(k)) {
                            Some(s) => valid(s, v, document),
                            None => match map.get("additionalProperties") {
                                Some(Value::Bool(false)) => false,
                                Some(s) if s.is_object() => valid(s, v, document),
                                _ => true,
                            },
                        })
            }
            _ => true,
        }
    }

    /// Writes a random document by picking, byte by byte, among the bytes the matcher takes
    /// (closing bytes favoured so documents end); `None` if none ended within the budget.
    fn random_document(g: &Arc<Grammar>, rng: &mut Rng) -> Option<String> {
        let mut m = JsonMatcher::new(g.clone());
        let mut out = Vec::new();
        let alphabet: Vec<u8> = (0x20u8..0x7F).chain([b'\n']).collect();
        for _ in 0..600 {
            if m.complete() && rng.next_f32() < 0.5 {
                break;
            }
            let allowed: Vec<u8> = alphabet
                .iter()
                .copied()
                .filter(|&b| m.accepts(&[b]))
                .collect();
            if allowed.is_empty() {
                break;
            }
            let closing: Vec<u8> = allowed
                .iter()
                .copied()
                .filter(|b| b"\"]}".contains(b))
                .collect();
            let pick = |set: &[u8], r: u64| set[r as usize % set.len()];
            let byte = if !closing.is_empty() && rng.next_f32() < 0.3 {
                pick(&closing, rng.next_u64())
            } else {
                pick(&allowed, rng.next_u64())
            };
            assert!(m.feed(&[byte]));
            out.push(byte);
        }
        m.complete().then(|| String::from_utf8(out).expect("ascii"))
    }

    #[test]
    fn every_document_the_matcher_lets_through_parses_and_validates() {
        let schemas = [
            person(),
            json!({"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, "minItems": 1, "maxItems": 4}),
            json!({"type": "object", "additionalProperties": {"type": "boolean"}}),
            json!({"enum": ["red", "reddish", 12, null, {"a": [1]}]}),
            json!({"$ref": "#/$defs/t", "$defs": {"t": {"type": "object", "properties": {"k": {"$ref": "#/$defs/t"}, "n": {"type": "number"}}}}}),
            json!({}),
        ];
        let mut rng = Rng::new(7);
        for schema in schemas {
            let g = grammar(schema.clone());
            let mut ended = 0;
            for _ in 0..200 {
                let Some(text) = random_document(&g, &mut rng) else {
                    continue;
                };
                ended += 1;
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{schema}: {text:?} does not parse: {e}"));
                assert!(
                    valid(&schema, &value, &schema),
                    "{schema}: {text} is not valid"
                );
            }
            assert!(
                ended >= 50,
                "{schema}: only {ended} of 200 random documents ended"
            );
        }
    }
}
