//! Constrained decoding: generation that can only produce JSON valid under a schema.
//!
//! - [`schema`]: a JSON Schema compiled into a [`Grammar`] (errors name the place and rule);
//! - [`matcher`]: a byte-level pushdown matcher of the documents the grammar allows;
//! - here: [`TokenMask`], which turns the matcher's state into the set of tokens that may
//!   come next (every token whose bytes keep the document valid; end of generation only
//!   once it is whole), applied to the logits before sampling.

pub mod matcher;
pub mod schema;

pub use matcher::JsonMatcher;
pub use schema::{Grammar, SchemaError};

use crate::tokenizer::Tokenizer;

/// Each token's bytes, and which tokens end generation: what masking needs of a vocabulary.
#[derive(Debug, Clone)]
pub struct TokenMask {
    /// `(vocab_size,)`: the bytes each token writes; empty for control and added tokens,
    /// which JSON output never takes.
    bytes: Vec<Box<[u8]>>,
    /// `(vocab_size,)`: for tokens that are plain string text (no quote, backslash or control
    /// byte; whole UTF-8), their character count.
    plain_chars: Vec<Option<u32>>,
    /// Tokens with bytes, sorted by them: neighbours share prefixes, so the walk in
    /// [`apply`](Self::apply) feeds each shared prefix once and skips a dead one's subtree.
    sorted: Vec<u32>,
    eog: Vec<u32>,
}

impl TokenMask {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let bytes: Vec<Box<[u8]>> = (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                let added = tokenizer.token_kind(id).is_some_and(|k| k.is_added());
                match tokenizer.token_bytes(id) {
                    Some(b) if !added => b.into(),
                    _ => Box::default(),
                }
            })
            .collect();
        Self::from_bytes(bytes, tokenizer.eos_ids().to_vec())
    }

    /// A mask over tokens writing `bytes` (empty: a control token), ending generation with
    /// `eog`.
    pub fn from_bytes(mut bytes: Vec<Box<[u8]>>, eog: Vec<u32>) -> Self {
        // End-of-generation tokens end the document; whatever text they carry is not written.
        for &id in &eog {
            if let Some(b) = bytes.get_mut(id as usize) {
                *b = Box::default();
            }
        }
        let plain_chars = bytes
            .iter()
            .map(|b| {
                let text = std::str::from_utf8(b).ok()?;
                let plain =
                    !b.is_empty() && !b.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20);
                plain.then(|| text.chars().count() as u32)
            })
            .collect();
        let mut sorted: Vec<u32> = (0..bytes.len() as u32)
            .filter(|&id| !bytes[id as usize].is_empty())
            .collect();
        sorted.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]));
        TokenMask {
            bytes,
            plain_chars,
            sorted,
            eog,
        }
    }

    /// Sets the logit of every token that may not come next to −∞; returns how many may.
    /// `logits` is `(vocab_size,)` (a longer model head keeps its extra rows masked).
    pub fn apply(&self, matcher: &JsonMatcher, logits: &mut [f32]) -> usize {
        let mut allowed = vec![false; logits.len()];
        if matcher.complete() {
            for &id in &self.eog {
                if let Some(a) = allowed.get_mut(id as usize) {
                    *a = true;
                }
            }
        }
        let string_room = matcher.plain_string_room();
        // states[k]: the matcher after the first k bytes of the last token walked.
        let mut states: Vec<JsonMatcher> = vec![matcher.clone()];
        let mut previous: &[u8] = &[];
        // The last token walked died at this byte: every token sharing its bytes up to and
        // including it dies too.
        let mut dead_at = usize::MAX;
        for &id in &self.sorted {
            if id as usize >= allowed.len() {
                continue;
            }
            if let (Some(room), Some(chars)) = (string_room, self.plain_chars[id as usize]) {
                allowed[id as usize] = chars as usize <= room;
                continue;
            }
            let bytes = &self.bytes[id as usize][..];
            let shared = common_prefix(previous, bytes);
            if shared > dead_at {
                continue;
            }
            states.truncate(shared + 1);
            previous = bytes;
            dead_at = usize::MAX;
            for (k, &byte) in bytes.iter().enumerate().skip(shared) {
                let mut next = states[k].clone();
                if !next.feed(&[byte]) {
                    dead_at = k;
                    break;
                }
                states.push(next);
            }
            allowed[id as usize] = dead_at == usize::MAX;
        }
        let mut n = 0;
        for (logit, ok) in logits.iter_mut().zip(allowed) {
            if ok {
                n += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        n
    }

    /// Whether `token` may come next (the check [`apply`](Self::apply) makes for one token).
    pub fn allows(&self, matcher: &JsonMatcher, token: u32) -> bool {
        match self.bytes.get(token as usize).map(|b| &b[..]) {
            Some([]) | None => matcher.complete() && self.eog.contains(&token),
            Some(bytes) => matcher.accepts(bytes),
        }
    }

    /// The bytes `token` writes (empty for control tokens).
    pub fn token_bytes(&self, token: u32) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], |b| &b[..])
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::sampler::Rng;

    /// A vocabulary of JSON pieces, text, digits, whitespace, split UTF-8 and tokens that
    /// close a string and go on, plus a control token (id 0) as end of generation.
    fn vocabulary(rng: &mut Rng) -> Vec<Box<[u8]>> {
        let mut vocab: Vec<Box<[u8]>> = vec![Box::default()];
        let pieces: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"",
            b"\",",
            b"\":",
            b"\"}",
            b"{\"",
            b"\"name\"",
            b"name",
            b"age",
            b"tags",
            b" ",
            b"  ",
            b"\n",
            b"\n  ",
            b" \"",
            b"\\",
            b"\\n",
            b"\\u00",
            b"e9",
            b"true",
            b"false",
            b"null",
            b"tru",
            b"-",
            b"0",
            b"1",
            b"12",
            b"3.5",
            b".",
            b"e",
            b"E+",
            b"\xC3",
            b"\xA9",
            b"\xC3\xA9",
            b"\xE6\x97\xA5",
            b"\xF0\x9F",
            b"\x98\x80",
            b"\t",
            b"red",
            b"green",
            b"\"red\"",
            b"]}",
            b"},{",
        ];
        vocab.extend(pieces.iter().map(|p| Box::<[u8]>::from(*p)));
        let alphabet = b"ab \"{}[],:0123456789-.eE\\\nxyz\xC3\xA9";
        for _ in 0..400 {
            let n = 1 + (rng.next_u64() % 5) as usize;
            let token: Vec<u8> = (0..n)
                .map(|_| alphabet[(rng.next_u64() % alphabet.len() as u64) as usize])
                .collect();
            vocab.push(token.into());
        }
        vocab
    }

    #[test]
    fn the_prefix_walk_allows_exactly_the_tokens_the_matcher_accepts() {
        let mut rng = Rng::new(11);
        let vocab = vocabulary(&mut rng);
        let mask = TokenMask::from_bytes(vocab.clone(), vec![0]);
        let schemas = [
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["red", "green", 1.5]}}
            }, "required": ["name"]}),
            json!({"type": "array", "items": {"type": ["number", "string", "boolean", "null"]}}),
            json!({}),
        ];
        for schema in schemas {
            let grammar = Arc::new(Grammar::from_schema(&schema).unwrap());
            for _ in 0..30 {
                // A random walk through the grammar, tokens drawn from the masked set; at
                // every step the walk's mask must equal accepting token by token.
                let mut matcher = JsonMatcher::new(grammar.clone());
                for _ in 0..40 {
                    let mut logits = vec![0.0f32; vocab.len()];
                    let n = mask.apply(&matcher, &mut logits);
                    let reference: Vec<bool> = (0..vocab.len() as u32)
                        .map(|id| mask.allows(&matcher, id))
                        .collect();
                    let walked: Vec<bool> = logits.iter().map(|l| l.is_finite()).collect();
                    assert_eq!(walked, reference, "{schema}");
                    assert_eq!(n, reference.iter().filter(|&&a| a).count());
                    let ids: Vec<u32> = (0..vocab.len() as u32)
                        .filter(|&i| walked[i as usize])
                        .collect();
                    assert!(!ids.is_empty(), "{schema}: a dead end");
                    let id = ids[(rng.next_u64() % ids.len() as u64) as usize];
                    if id == 0 {
                        assert!(matcher.complete());
                        break;
                    }
                    assert!(matcher.feed(&vocab[id as usize]));
                }
            }
        }
    }
}
