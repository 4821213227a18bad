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
    /// `(vocab_size,)`: the bytes each token writes; empty for control tokens, which JSON
    /// output never takes.
    bytes: Vec<Box<[u8]>>,
    eog: Vec<u32>,
}

impl TokenMask {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let bytes = (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                let special = tokenizer.token_kind(id).is_some_and(|k| k.is_added());
                match tokenizer.token_bytes(id) {
                    Some(b) if !special => b.into(),
                    _ => Box::default(),
                }
            })
            .collect();
        TokenMask {
            bytes,
            eog: tokenizer.eos_ids().to_vec(),
        }
    }

    /// Sets the logit of every token that may not come next to −∞; returns how many may.
    /// `logits` is `(vocab_size,)` (longer model heads keep their extra rows masked).
    pub fn apply(&self, matcher: &JsonMatcher, logits: &mut [f32]) -> usize {
        let mut first = [false; 256];
        for (byte, ok) in first.iter_mut().enumerate() {
            *ok = matcher.accepts(&[byte as u8]);
        }
        let complete = matcher.complete();
        let mut allowed = 0;
        for (id, logit) in logits.iter_mut().enumerate() {
            let ok = match self.bytes.get(id).map(|b| &b[..]) {
                Some([]) | None => complete && self.eog.contains(&(id as u32)),
                Some([b]) => first[*b as usize],
                Some(bytes) => first[bytes[0] as usize] && matcher.accepts(bytes),
            };
            if ok {
                allowed += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        allowed
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
