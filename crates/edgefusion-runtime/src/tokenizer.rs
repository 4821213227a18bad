//! Text ↔ token ids for Llama-family models, from GGUF metadata or a Hugging Face
//! `tokenizer.json`.
//!
//! Encoding runs on the `tokenizers` crate, configured from GGUF metadata so that it splits
//! and merges the way llama.cpp does: the pre-tokenizer regexes are chosen by
//! `tokenizer.ggml.pre` from the same table llama.cpp keeps (`src/llama-vocab.cpp`), control
//! and user-defined tokens are matched whole before any splitting, and BOS/EOS follow
//! `tokenizer.ggml.add_bos_token` / `add_eos_token` with llama.cpp's per-model defaults.
//!
//! Decoding is ours: every token's bytes are computed once at load (the GPT-2 byte map
//! undone, or SentencePiece's `▁` and `<0xNN>` tokens resolved), so `decode` is a
//! concatenation and [`TokenStreamer`] can hold back a character split across tokens.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use edgefusion_io::gguf::GgufFile;
use edgefusion_io::IoError;
use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// GGUF keys read here (the `tokenizer.ggml.` namespace of the GGUF spec).
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    pub const GENERAL_NAME: &str = "general.name";
    /// A whole Hugging Face `tokenizer.json` (written by `edgefusion convert`).
    pub const HF_JSON: &str = edgefusion_model::convert::TOKENIZER_JSON_KEY;
    pub const HF_TOKENIZER_CONFIG: &str = edgefusion_model::convert::TOKENIZER_CONFIG_KEY;
    pub const HF_GENERATION_CONFIG: &str = edgefusion_model::convert::GENERATION_CONFIG_KEY;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key is missing or has the wrong type; the error names file and key.
    #[error(transparent)]
    Metadata(#[from] IoError),

    #[error("{}: {key} = `{model}` is not supported (supported: `gpt2` byte-level BPE, `llama` SentencePiece BPE)", path.display())]
    UnsupportedModel {
        path: PathBuf,
        key: &'static str,
        model: String,
    },

    #[error("{}: {key} = `{pre}` is not a pre-tokenizer we know{hint}", path.display())]
    UnknownPreTokenizer {
        path: PathBuf,
        key: &'static str,
        pre: String,
        /// Extra advice; empty or starting with "; ".
        hint: String,
    },

    /// A value is present with the right type but breaks a rule (lengths disagree, an id is
    /// out of range, a merge is malformed).
    #[error("{}: {key}: {problem}", path.display())]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        problem: String,
    },

    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: not a tokenizer we can load: {problem}", path.display())]
    BadTokenizerJson { path: PathBuf, problem: String },

    #[error("{}: building the tokenizer failed: {message}", path.display())]
    Build { path: PathBuf, message: String },

    #[error("encoding failed: {message}")]
    Encode { message: String },

    #[error("writing tokenizer.json failed: {message}")]
    Export { message: String },

    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
}

/// What a vocabulary entry is, from GGUF's `tokenizer.ggml.token_type` (llama.cpp's
/// `llama_token_type`: 0 undefined, 1 normal, 2 unknown, 3 control, 4 user-defined,
/// 5 unused, 6 byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Type 0; like [`Unused`](Self::Unused), it decodes to nothing.
    Undefined,
    Normal,
    Unknown,
    /// BOS, EOS, `<|im_start|>`: matched whole in text, hidden when decoding without specials.
    Control,
    /// Added by the model's authors; matched whole in text, always shown.
    UserDefined,
    Unused,
    /// SentencePiece byte fallback `<0xNN>`.
    Byte,
}

impl TokenKind {
    fn from_gguf(code: i32) -> Option<Self> {
        Some(match code {
            0 => TokenKind::Undefined,
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => return None,
        })
    }

    /// Hidden by `decode_with(.., skip_special = true)`, as llama.cpp hides them when
    /// rendering a piece with `special = false`.
    fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }

    /// Matched as a whole in the input before splitting, never broken up.
    pub(crate) fn is_added(self) -> bool {
        matches!(
            self,
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
        )
    }
}

/// How vocabulary strings map to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabStyle {
    /// GPT-2 byte-level BPE: each byte is stored as a printable character.
    ByteLevel,
    /// SentencePiece: `▁` stands for a space, `<0xNN>` tokens carry raw bytes.
    SentencePiece {
        /// A space is put before the text when encoding, so one is taken off the first
        /// token when decoding a whole sequence.
        add_space_prefix: bool,
    },
}

/// Texts of tokens that end generation, as llama.cpp lists them (`llama_vocab::impl::load`).
/// llama.cpp also makes each of them a control token, whatever type the file gives it.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
    "[e~[",
    // Fill-in-the-middle pad, repository and file-separator tokens also end generation.
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// Fill-in-the-middle prefix / suffix / middle tokens, which llama.cpp makes control tokens.
const FIM_MARKER_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{FF5C}fim\u{2581}begin\u{FF5C}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{FF5C}fim\u{2581}hole\u{FF5C}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{FF5C}fim\u{2581}end\u{FF5C}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

/// gpt-oss message-structure tokens, which llama.cpp always writes out (user-defined).
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// llama.cpp's corrections to the token types in a file, and its end-of-generation tokens
/// found by text (`llama_vocab::impl::load`): end-of-generation and FIM marker tokens become
/// control tokens; gpt-oss `<|end|>` is not an end when `<|return|>` and `<|call|>` are
/// there (likewise Solar's `<|calls|>` / `<|flush|>`); `</s>` is an ordinary token in
/// vocabularies that end turns with `<|tool_response>` or `<|plamo:eos|>`.
fn llama_cpp_type_overrides(texts: &[String], kinds: &mut [TokenKind]) -> Vec<u32> {
    let mut eog_ids = Vec::new();
    for (id, (text, kind)) in texts.iter().zip(kinds.iter_mut()).enumerate() {
        let text = text.as_str();
        if END_OF_GENERATION_TEXTS.contains(&text) {
            eog_ids.push(id as u32);
            *kind = TokenKind::Control;
        } else if FIM_MARKER_TEXTS.contains(&text) {
            *kind = TokenKind::Control;
        } else if ALWAYS_RENDERED_TEXTS.contains(&text) {
            *kind = TokenKind::UserDefined;
        }
    }
    let eog_id_of = |eog_ids: &[u32], wanted: &str| {
        eog_ids
            .iter()
            .copied()
            .find(|&id| texts[id as usize] == wanted)
    };
    let has = |eog_ids: &[u32], wanted: &str| eog_id_of(eog_ids, wanted).is_some();
    if let Some(end) = eog_id_of(&eog_ids, "<|end|>") {
        if (has(&eog_ids, "<|return|>") && has(&eog_ids, "<|call|>"))
            || (has(&eog_ids, "<|calls|>") && has(&eog_ids, "<|flush|>"))
        {
            eog_ids.retain(|&id| id != end);
            kinds[end as usize] = TokenKind::UserDefined;
        }
    }
    let plamo_eos = texts.iter().any(|text| text == "<|plamo:eos|>");
    if let Some(close) = eog_id_of(&eog_ids, "</s>") {
        if has(&eog_ids, "<|tool_response>") || plamo_eos {
            eog_ids.retain(|&id| id != close);
            kinds[close as usize] = TokenKind::Normal;
        }
    }
    eog_ids
}

/// A loaded tokenizer. Cheap to share across threads (`Send + Sync`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    style: VocabStyle,
    /// Vocabulary strings as stored (byte-level or `▁` form), indexed by id.
    texts: Vec<String>,
    /// The bytes each token stands for, indexed by id.
    piece_bytes: Vec<Box<[u8]>>,
    kinds: Vec<TokenKind>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    /// `eos_id` first, then every other end-of-generation token in id order.
    eog_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    pre: Option<String>,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("style", &self.style)
            .field("vocab_size", &self.texts.len())
            .field("pre", &self.pre)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eog_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// What `tokenizer.ggml.model` asks for.
enum Recipe {
    ByteLevel { spec: BpePreSpec, pre: String },
    SentencePiece { add_space_prefix: bool },
}

/// The pieces every constructor gathers before the common tail in [`Tokenizer::assemble`].
struct Parts {
    inner: tokenizers::Tokenizer,
    style: VocabStyle,
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    /// End-of-generation ids besides EOS.
    extra_eog_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    pre: Option<String>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let path = gguf.path.as_path();
        if gguf.get(keys::MODEL).is_none() && gguf.get(keys::HF_JSON).is_some() {
            return Self::from_gguf_hf_json(gguf);
        }
        let model = gguf.get_str(keys::MODEL)?;
        let texts: Vec<String> = gguf
            .get_str_array(keys::TOKENS)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        if texts.is_empty() {
            return Err(invalid(path, keys::TOKENS, "the vocabulary is empty"));
        }
        let n_vocab = texts.len();
        let mut kinds = read_token_kinds(gguf, n_vocab)?;
        let mut extra_eog_ids = llama_cpp_type_overrides(&texts, &mut kinds);

        let recipe = match model {
            "gpt2" => {
                // Without the key llama.cpp warns and falls back to its default regexes.
                let pre = optional_str(gguf, keys::PRE)?
                    .unwrap_or("default")
                    .to_owned();
                let spec = bpe_pre_spec(&pre).ok_or_else(|| unknown_pre(path, &pre))?;
                Recipe::ByteLevel { spec, pre }
            }
            "llama" => Recipe::SentencePiece {
                add_space_prefix: optional_bool(gguf, keys::ADD_SPACE_PREFIX)?.unwrap_or(true),
            },
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    path: path.to_path_buf(),
                    key: keys::MODEL,
                    model: other.to_owned(),
                })
            }
        };

        // llama.cpp's defaults per model type, which the keys below override.
        let in_vocab = |id: u32| ((id as usize) < n_vocab).then_some(id);
        let (mut bos_id, mut eos_id, mut unk_id, default_add_bos) = match &recipe {
            Recipe::ByteLevel { spec, .. } => {
                // Falcon's ids, which llama.cpp keeps as the gpt2 defaults.
                let falcon_special = in_vocab(11);
                let bos = if spec.drops_bos { None } else { falcon_special };
                (bos, falcon_special, None, spec.add_bos)
            }
            Recipe::SentencePiece { .. } => (in_vocab(1), in_vocab(2), in_vocab(0), true),
        };
        if let Some(id) = optional_token_id(gguf, keys::BOS_ID, n_vocab)? {
            bos_id = Some(id);
        }
        if let Some(id) = optional_token_id(gguf, keys::EOS_ID, n_vocab)? {
            eos_id = Some(id);
        }
        if let Some(id) = optional_token_id(gguf, keys::UNK_ID, n_vocab)? {
            unk_id = Some(id);
        }
        let pad_id = optional_token_id(gguf, keys::PAD_ID, n_vocab)?;
        for key in [keys::EOT_ID, keys::EOM_ID] {
            extra_eog_ids.extend(optional_token_id(gguf, key, n_vocab)?);
        }
        let add_bos = optional_bool(gguf, keys::ADD_BOS)?.unwrap_or(default_add_bos);
        let add_eos = optional_bool(gguf, keys::ADD_EOS)?.unwrap_or(false);
        let chat_template = optional_str(gguf, keys::CHAT_TEMPLATE)?.map(str::to_owned);
        // llama.cpp (after the Hugging Face tokenizer) eats the whitespace after Phi-3's
        // special tokens, which it recognises by the model name.
        let whole_tokens = WholeTokenRules {
            rstrip_specials: optional_str(gguf, keys::GENERAL_NAME)?.is_some_and(|name| {
                let name = name.to_lowercase();
                name.contains("phi-3") || name.contains("phi3")
            }),
        };

        let (inner, style, pre) = match recipe {
            Recipe::ByteLevel { spec, pre } => {
                let merges = gguf.get_str_array(keys::MERGES)?;
                let inner = build_byte_level(path, &texts, &kinds, whole_tokens, &merges, spec)?;
                (inner, VocabStyle::ByteLevel, Some(pre))
            }
            Recipe::SentencePiece { add_space_prefix } => {
                let scores = read_scores(gguf, n_vocab)?;
                let unk_text = unk_id.map(|id| texts[id as usize].as_str());
                let inner = build_sentencepiece(
                    path,
                    &texts,
                    &kinds,
                    whole_tokens,
                    &scores,
                    unk_text,
                    add_space_prefix,
                )?;
                (inner, VocabStyle::SentencePiece { add_space_prefix }, None)
            }
        };

        Ok(Self::assemble(Parts {
            inner,
            style,
            texts,
            kinds,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            extra_eog_ids,
            add_bos,
            add_eos,
            pre,
            chat_template,
        }))
    }

    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS, `add_bos_token` and the chat template
    /// come from `tokenizer_config.json` in the same folder when it is there; otherwise BOS is
    /// taken from the post-processor template (`<s> $A`), and EOS from the usual
    /// end-of-turn token texts.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let json_text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = read_sibling_json(path, "tokenizer_config.json")?;
        let generation = read_sibling_json(path, "generation_config.json")?;
        Self::from_hf_parts(path, &json_text, config, generation)
    }

    /// The Hugging Face tokenizer a converted GGUF carries whole (`tokenizer.huggingface.json`
    /// with its `tokenizer_config.json` and `generation_config.json`).
    fn from_gguf_hf_json(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let path = gguf.path.as_path();
        let json_text = gguf.get_str(keys::HF_JSON)?;
        let sibling = |key: &'static str| -> Result<Option<Json>, TokenizerError> {
            match optional_str(gguf, key)? {
                None => Ok(None),
                Some(text) => serde_json::from_str(text).map(Some).map_err(|e| {
                    TokenizerError::BadTokenizerJson {
                        path: path.to_path_buf(),
                        problem: format!("{key}: invalid JSON: {e}"),
                    }
                }),
            }
        };
        let config = sibling(keys::HF_TOKENIZER_CONFIG)?;
        let generation = sibling(keys::HF_GENERATION_CONFIG)?;
        Self::from_hf_parts(path, json_text, config, generation)
    }

    /// A `tokenizer.json` text with its two sibling configs; `path` names it in errors.
    fn from_hf_parts(
        path: &Path,
        json_text: &str,
        config: Option<Json>,
        generation: Option<Json>,
    ) -> Result<Self, TokenizerError> {
        let bad = |problem: String| TokenizerError::BadTokenizerJson {
            path: path.to_path_buf(),
            problem,
        };
        let doc: Json =
            serde_json::from_str(json_text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let model_type = doc
            .pointer("/model/type")
            .and_then(Json::as_str)
            .unwrap_or("");
        if model_type != "BPE" {
            return Err(bad(format!(
                "model.type is `{model_type}`; only BPE tokenizers are supported"
            )));
        }
        let inner = tokenizers::Tokenizer::from_bytes(json_text.as_bytes())
            .map_err(|e| bad(e.to_string()))?;

        let vocab = inner.get_vocab(true);
        let n_vocab = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if n_vocab == 0 {
            return Err(bad("the vocabulary is empty".to_owned()));
        }
        // Ids index tables here; a stray huge id must not make us allocate for it.
        if n_vocab > 2 * vocab.len() + 1024 {
            return Err(bad(format!(
                "token ids go up to {} for {} tokens; ids must be nearly contiguous",
                n_vocab - 1,
                vocab.len()
            )));
        }
        let mut texts = vec![String::new(); n_vocab];
        let mut kinds = vec![TokenKind::Unused; n_vocab];
        for (text, &id) in &vocab {
            texts[id as usize] = text.clone();
            kinds[id as usize] = TokenKind::Normal;
        }
        let byte_fallback = doc
            .pointer("/model/byte_fallback")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        if byte_fallback {
            for (text, kind) in texts.iter().zip(kinds.iter_mut()) {
                if parse_byte_token(text).is_some() {
                    *kind = TokenKind::Byte;
                }
            }
        }
        for (id, added) in inner.get_added_tokens_decoder() {
            if let Some(kind) = kinds.get_mut(id as usize) {
                *kind = if added.special {
                    TokenKind::Control
                } else {
                    TokenKind::UserDefined
                };
            }
        }

        let decoder = doc.get("decoder").cloned().unwrap_or(Json::Null);
        let style = if json_has_type(&decoder, "ByteLevel") {
            VocabStyle::ByteLevel
        } else if byte_fallback
            || json_has_type(&decoder, "Metaspace")
            || json_has_type(&decoder, "ByteFallback")
        {
            VocabStyle::SentencePiece {
                add_space_prefix: json_strips_leading_space(&decoder),
            }
        } else {
            return Err(bad(
                "the decoder is neither byte-level nor SentencePiece-style".to_owned(),
            ));
        };

        let id_of = |text: &str| vocab.get(text).copied();
        let config_token = |field: &str| -> Option<u32> {
            let value = config.as_ref()?.get(field)?;
            let text = value
                .as_str()
                .or_else(|| value.get("content").and_then(Json::as_str))?;
            id_of(text)
        };
        let template_bos =
            first_template_special(doc.get("post_processor")).and_then(|text| id_of(&text));
        let bos_id = config_token("bos_token").or(template_bos);
        let eos_id = config_token("eos_token");
        let unk_id = doc
            .pointer("/model/unk_token")
            .and_then(Json::as_str)
            .and_then(id_of)
            .or_else(|| config_token("unk_token"));
        let pad_id = config_token("pad_token");
        let config_bool = |field: &str| config.as_ref()?.get(field)?.as_bool();
        let add_bos = config_bool("add_bos_token").unwrap_or(template_bos.is_some());
        let add_eos = config_bool("add_eos_token").unwrap_or(false);
        let chat_template = config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(chat_template_from_config);

        // The end-of-generation tokens by text; the type corrections are left out because
        // here the file's own added-token list decides what is matched whole.
        let mut extra_eog_ids = llama_cpp_type_overrides(&texts, &mut kinds.clone());
        if let Some(generation) = generation {
            match generation.get("eos_token_id") {
                Some(Json::Array(ids)) => extra_eog_ids.extend(
                    ids.iter()
                        .filter_map(Json::as_u64)
                        .filter_map(|id| u32::try_from(id).ok()),
                ),
                Some(id) => extra_eog_ids.extend(id.as_u64().and_then(|id| u32::try_from(id).ok())),
                None => {}
            }
            extra_eog_ids.retain(|&id| (id as usize) < n_vocab);
        }

        Ok(Self::assemble(Parts {
            inner,
            style,
            texts,
            kinds,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            extra_eog_ids,
            add_bos,
            add_eos,
            pre: None,
            chat_template,
        }))
    }

    /// The common tail: per-token bytes and the end-of-generation set.
    fn assemble(parts: Parts) -> Self {
        let byte_map = ByteMap::new();
        let piece_bytes = parts
            .texts
            .iter()
            .zip(&parts.kinds)
            .map(|(text, &kind)| piece_bytes_of(text, kind, parts.style, &byte_map))
            .collect();

        let mut eog_ids: Vec<u32> = parts.eos_id.into_iter().collect();
        let mut others: Vec<u32> = parts.extra_eog_ids;
        others.sort_unstable();
        others.dedup();
        eog_ids.extend(others.into_iter().filter(|&id| Some(id) != parts.eos_id));

        Tokenizer {
            inner: parts.inner,
            style: parts.style,
            texts: parts.texts,
            piece_bytes,
            kinds: parts.kinds,
            bos_id: parts.bos_id,
            eos_id: parts.eos_id,
            unk_id: parts.unk_id,
            pad_id: parts.pad_id,
            eog_ids,
            add_bos: parts.add_bos,
            add_eos: parts.add_eos,
            pre: parts.pre,
            chat_template: parts.chat_template,
        }
    }

    /// Text to ids. Control and user-defined tokens written in the text (`<|im_start|>`)
    /// become their ids, as llama.cpp does with `parse_special = true`. With `add_special`,
    /// BOS is put first if the model wants it (`add_bos()`), and EOS last if it wants that.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        let body = encoding.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(body);
        if add_special && self.add_eos {
            ids.extend(self.eos_id);
        }
        Ok(ids)
    }

    /// Ids to text, special tokens included (`<|im_end|>` is written out). For
    /// SentencePiece vocabularies the space the encoder put in front of the first token is
    /// taken off again, so `decode(encode(s, false)) == s`. No clean-up of spaces before
    /// punctuation (llama.cpp's `clean_spaces`) is done: the text is exactly the tokens'.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, false)
    }

    /// [`decode`](Self::decode), optionally leaving out control and unknown tokens.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        // llama.cpp's detokenize strips one space from the first token only (even when that
        // token is a skipped BOS, so then nothing is stripped).
        let strip_first_space = matches!(
            self.style,
            VocabStyle::SentencePiece {
                add_space_prefix: true
            }
        );
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (position, &id) in ids.iter().enumerate() {
            let kind = self.kind_checked(id)?;
            if skip_special && kind.is_special() {
                continue;
            }
            let mut piece: &[u8] = &self.piece_bytes[id as usize];
            if position == 0 && strip_first_space && kind == TokenKind::Normal {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            bytes.extend_from_slice(piece);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A streaming decoder that hides control tokens, as llama.cpp's CLI prints them.
    pub fn streamer(&self) -> TokenStreamer<'_> {
        TokenStreamer::new(self, true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Every token that ends generation: EOS first, then end-of-turn tokens such as
    /// `<|im_end|>`, `<|eot_id|>` or `<|endoftext|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eog_ids.contains(&id)
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether `encode(.., add_special = true)` puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos_id.is_some()
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos_id.is_some()
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The vocabulary string of a token as stored (`Ġhello`, `▁hello`, `<|im_end|>`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The bytes a token decodes to (possibly part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.piece_bytes.get(id as usize).map(|bytes| &bytes[..])
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The id of a vocabulary string as stored (see [`token_str`](Self::token_str)).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn style(&self) -> VocabStyle {
        self.style
    }

    /// `tokenizer.ggml.pre` (or `default` when a byte-level GGUF has none); `None` for
    /// SentencePiece vocabularies and `tokenizer.json` files.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        self.pre.as_deref()
    }

    /// The model's Jinja chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The encoder as a Hugging Face `tokenizer.json` (BOS/EOS and the chat template live
    /// in `tokenizer_config.json` there and are not included).
    pub fn to_tokenizer_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Export {
                message: e.to_string(),
            })
    }

    fn kind_checked(&self, id: u32) -> Result<TokenKind, TokenizerError> {
        self.kinds
            .get(id as usize)
            .copied()
            .ok_or(TokenizerError::TokenOutOfRange {
                id,
                vocab_size: self.texts.len(),
            })
    }
}

/// Turns generated ids into text as they arrive. A token that ends inside a UTF-8
/// character is held back until the character is complete; bytes that can never form a
/// character come out as U+FFFD, the same as [`Tokenizer::decode`] would write.
///
/// ```ignore
/// let mut streamer = tokenizer.streamer();
/// for id in generated {
///     if let Some(text) = streamer.push(id)? { print!("{text}"); }
/// }
/// if let Some(text) = streamer.finish() { print!("{text}"); }
/// ```
#[derive(Debug)]
pub struct TokenStreamer<'t> {
    tokenizer: &'t Tokenizer,
    skip_special: bool,
    /// Bytes of a character whose tail has not arrived yet (at most 3).
    pending: Vec<u8>,
}

impl<'t> TokenStreamer<'t> {
    /// `skip_special`: leave control tokens (`<|im_end|>`) out of the text.
    pub fn new(tokenizer: &'t Tokenizer, skip_special: bool) -> Self {
        TokenStreamer {
            tokenizer,
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that became complete, if any. Pieces are not
    /// stripped of leading spaces: the stream continues text that came before it.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let kind = self.tokenizer.kind_checked(id)?;
        if self.skip_special && kind.is_special() {
            return Ok(None);
        }
        self.pending
            .extend_from_slice(&self.tokenizer.piece_bytes[id as usize]);
        Ok(non_empty(take_complete_text(&mut self.pending, false)))
    }

    /// Ends the stream: bytes of a character that never completed come out as U+FFFD.
    pub fn finish(&mut self) -> Option<String> {
        non_empty(take_complete_text(&mut self.pending, true))
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Removes and returns the longest prefix of `pending` that is finished text. Invalid
/// sequences become U+FFFD exactly as `String::from_utf8_lossy` would write them; an
/// incomplete character at the end stays in `pending` unless `at_end`.
fn take_complete_text(pending: &mut Vec<u8>, at_end: bool) -> String {
    let mut text = String::new();
    let mut consumed = 0;
    while consumed < pending.len() {
        match std::str::from_utf8(&pending[consumed..]) {
            Ok(rest) => {
                text.push_str(rest);
                consumed = pending.len();
            }
            Err(error) => {
                let valid_end = consumed + error.valid_up_to();
                text.push_str(&String::from_utf8_lossy(&pending[consumed..valid_end]));
                match error.error_len() {
                    Some(invalid_len) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        consumed = valid_end + invalid_len;
                    }
                    None if at_end => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        consumed = pending.len();
                    }
                    None => {
                        consumed = valid_end;
                        break;
                    }
                }
            }
        }
    }
    pending.drain(..consumed);
    text
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizer table

/// How a byte-level BPE vocabulary splits text before merging, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy)]
struct BpePreSpec {
    /// Applied in order; each splits the pieces the previous one left, keeping both the
    /// matches and the text between them (llama.cpp's `unicode_regex_split`).
    regexes: &'static [&'static str],
    /// A piece that is itself a vocabulary entry becomes that token without merging.
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` before the GGUF key is read.
    add_bos: bool,
    /// llama.cpp clears the default BOS id for this pre-tokenizer (ChatGLM).
    drops_bos: bool,
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
// The tokenizer.json originals use `(?i:'s|...)`; llama.cpp spells the case-insensitive
// contractions out, which also keeps Unicode case folding (`ſ`, the Kelvin sign) out.
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE_PATTERN: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const EXAONE_MOE_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";
const MINICPM5_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM_PATTERN: &str = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+";
const DEEPSEEK3_PATTERN: &str = r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+";

/// The regex list llama.cpp uses for each `tokenizer.ggml.pre` value
/// (`llm_tokenizer_bpe::llm_tokenizer_bpe` and the name switch in `llama_vocab::impl::load`).
fn bpe_pre_spec(pre: &str) -> Option<BpePreSpec> {
    const fn plain(regexes: &'static [&'static str]) -> BpePreSpec {
        BpePreSpec {
            regexes,
            ignore_merges: false,
            add_bos: false,
            drops_bos: false,
        }
    }
    Some(match pre {
        "default" => plain(&[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_PATTERN,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => BpePreSpec {
            ignore_merges: true,
            add_bos: true,
            ..plain(&[LLAMA3_PATTERN])
        },
        "dbrx" | "smaug-bpe" => plain(&[LLAMA3_PATTERN]),
        "jais-2" => plain(&[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
        ]),
        "deepseek-llm" => plain(&[
            r"[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
            r"\s+$",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}+",
        ]),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => plain(&[
            r"\p{N}{1,3}",
            r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
            DEEPSEEK3_PATTERN,
        ]),
        "deepseek-coder" => plain(&[
            r"[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}",
        ]),
        "falcon" => plain(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, r"[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => plain(&[r"\p{N}", GPT2_PATTERN]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            plain(&[GPT2_PATTERN])
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => plain(&[QWEN2_PATTERN]),
        "qwen35" => plain(&[QWEN35_PATTERN]),
        "ufakzeka" => plain(&[
            r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ]),
        "laguna" => plain(&[r"[^\n]+|[\n]+", QWEN2_PATTERN]),
        "poro-chat" | "bloom" | "gpt3-finnish" => plain(&[BLOOM_PATTERN]),
        "viking" => plain(&[BLOOM_PATTERN, r"\p{N}"]),
        "chatglm-bpe" => BpePreSpec {
            drops_bos: true,
            ..plain(&[LLAMA3_PATTERN])
        },
        "glm4" | "glm5" => BpePreSpec {
            drops_bos: true,
            ignore_merges: true,
            ..plain(&[LLAMA3_PATTERN])
        },
        "tekken" => BpePreSpec {
            ignore_merges: true,
            add_bos: true,
            ..plain(&[TEKKEN_PATTERN])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => plain(&[GPT4O_PATTERN]),
        "seed-coder" => plain(&[SEED_CODER_PATTERN]),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => plain(&[BAILINGMOE_PATTERN]),
        "exaone-moe" => plain(&[EXAONE_MOE_PATTERN]),
        "minicpm5" => BpePreSpec {
            ignore_merges: true,
            ..plain(&[r"\p{N}{1,3}", MINICPM5_PATTERN])
        },
        _ => return None,
    })
}

/// Names llama.cpp knows but whose splitting needs more than a regex list (custom code in
/// its `unicode.cpp`, or raw-UTF-8 BPE without the byte map).
const PRE_NEEDING_CUSTOM_CODE: &[&str] = &[
    "kimi-k2",
    "afmoe",
    "superbpe",
    "gemma4",
    "granite-embed-multi-311m",
    "granite-embed-multi-97m",
    "sarvam-moe",
    "whitespace",
    "chameleon",
    "tiny_aya",
    "cohere2moe",
    "spark2_5",
    "youtu",
];

fn unknown_pre(path: &Path, pre: &str) -> TokenizerError {
    let hint = if PRE_NEEDING_CUSTOM_CODE.contains(&pre) {
        "; llama.cpp supports it with custom splitting code we have not ported".to_owned()
    } else {
        "; it may be newer than this build (see llama.cpp's src/llama-vocab.cpp)".to_owned()
    };
    TokenizerError::UnknownPreTokenizer {
        path: path.to_path_buf(),
        key: keys::PRE,
        pre: pre.to_owned(),
        hint,
    }
}

// ---------------------------------------------------------------------------------------
// Building the `tokenizers` pipeline

fn build_byte_level(
    path: &Path,
    texts: &[String],
    kinds: &[TokenKind],
    whole_tokens: WholeTokenRules,
    merges: &[&str],
    spec: BpePreSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = vocab_map(texts);
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        // Split at the first space after the first byte, as llama.cpp does: a left half
        // never is empty, and byte-level halves hold no raw spaces.
        let split_at = merge
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|p| p + 1)
            .ok_or_else(|| {
                invalid(
                    path,
                    keys::MERGES,
                    format!("merge {index} `{merge}` has no space between its two halves"),
                )
            })?;
        let (left, right) = (&merge[..split_at], &merge[split_at + 1..]);
        // The `tokenizers` BPE refuses merges whose halves or result are not tokens;
        // llama.cpp could apply such a merge but never emit its result as one token, so
        // leaving it out changes nothing but the rank order of impossible merges.
        let merged = format!("{left}{right}");
        if vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&merged) {
            merge_pairs.push((left.to_owned(), right.to_owned()));
        }
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, merge_pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| build_error(path, e))?;

    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for regex in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| build_error(path, format!("pre-tokenizer regex `{regex}`: {e}")))?;
        pre_tokenizers.push(split.into());
    }
    // The byte map only; the splitting was done by the regexes above.
    pre_tokenizers.push(ByteLevel::new(false, false, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(pre_tokenizers)));
    // Our decode does not use it; it makes `to_tokenizer_json` a complete tokenizer.
    tokenizer.with_decoder(Some(ByteLevel::default()));
    add_whole_tokens(&mut tokenizer, texts, kinds, whole_tokens);
    Ok(tokenizer)
}

fn build_sentencepiece(
    path: &Path,
    texts: &[String],
    kinds: &[TokenKind],
    whole_tokens: WholeTokenRules,
    scores: &[f32],
    unk_text: Option<&str>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = vocab_map(texts);
    let merge_pairs = merges_from_scores(texts, scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merge_pairs)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk_text {
        builder = builder.unk_token(unk.to_owned());
    }
    let model = builder.build().map_err(|e| build_error(path, e))?;

    let space_to_marker: NormalizerWrapper = Replace::new(" ", "▁")
        .map_err(|e| build_error(path, e))?
        .into();
    let normalizer: NormalizerWrapper = if add_space_prefix {
        // Runs on each stretch of text between whole-matched tokens, which is where
        // llama.cpp adds its prefix space too (after BOS and after every special token).
        tokenizers::normalizers::Sequence::new(vec![
            Prepend::new("▁".to_owned()).into(),
            space_to_marker,
        ])
        .into()
    } else {
        space_to_marker
    };

    // The Hugging Face Llama decoder; as above, for `to_tokenizer_json`.
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| build_error(path, e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    add_whole_tokens(&mut tokenizer, texts, kinds, whole_tokens);
    Ok(tokenizer)
}

/// SentencePiece BPE merges by score: the pair whose concatenation is the best-scoring
/// token merges first, which is what llama.cpp's SPM tokenizer does with its bigram queue.
/// Ties keep vocabulary order.
fn merges_from_scores(
    texts: &[String],
    scores: &[f32],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    // (score of the merged token, merged id, left, right)
    let mut ranked: Vec<(f32, u32, &str, &str)> = Vec::new();
    for (id, text) in texts.iter().enumerate() {
        if vocab.get(text.as_str()) != Some(&(id as u32)) {
            continue; // a duplicate string; the later id owns it
        }
        for (split_at, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(split_at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id as u32, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked
        .into_iter()
        .map(|(_, _, left, right)| (left.to_owned(), right.to_owned()))
        .collect()
}

/// Vocabulary string → id. A string listed twice maps to its last id, as in llama.cpp.
fn vocab_map(texts: &[String]) -> tokenizers::models::bpe::Vocab {
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(texts.len());
    for (id, text) in texts.iter().enumerate() {
        vocab.insert(text.clone(), id as u32);
    }
    vocab
}

#[derive(Debug, Clone, Copy, Default)]
struct WholeTokenRules {
    /// Whitespace after a whole-matched token is dropped, except after `<unk>`, `<s>` and
    /// `<|endoftext|>` (llama.cpp's Phi-3 rule).
    rstrip_specials: bool,
}

/// Registers control, unknown and user-defined tokens to be matched whole in raw text.
fn add_whole_tokens(
    tokenizer: &mut tokenizers::Tokenizer,
    texts: &[String],
    kinds: &[TokenKind],
    rules: WholeTokenRules,
) {
    let whole: Vec<AddedToken> = texts
        .iter()
        .zip(kinds)
        .filter(|(text, kind)| kind.is_added() && !text.is_empty())
        .map(|(text, &kind)| {
            let rstrip = rules.rstrip_specials
                && !matches!(text.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
            AddedToken::from(text.clone(), kind != TokenKind::UserDefined)
                .normalized(false)
                .rstrip(rstrip)
        })
        .collect();
    if !whole.is_empty() {
        // One call: each call rebuilds the matcher over all added tokens.
        tokenizer.add_tokens(&whole);
    }
}

fn build_error(path: &Path, error: impl fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

fn invalid(path: &Path, key: &str, problem: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidMetadata {
        path: path.to_path_buf(),
        key: key.to_owned(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------------------
// GGUF metadata helpers

fn read_token_kinds(gguf: &GgufFile, n_vocab: usize) -> Result<Vec<TokenKind>, TokenizerError> {
    let path = gguf.path.as_path();
    if gguf.get(keys::TOKEN_TYPE).is_none() {
        return Ok(vec![TokenKind::Normal; n_vocab]);
    }
    let codes = gguf.get_i32_array(keys::TOKEN_TYPE)?;
    if codes.len() < n_vocab {
        return Err(invalid(
            path,
            keys::TOKEN_TYPE,
            format!(
                "has {} entries for {n_vocab} tokens in {}",
                codes.len(),
                keys::TOKENS
            ),
        ));
    }
    codes[..n_vocab]
        .iter()
        .enumerate()
        .map(|(id, &code)| {
            TokenKind::from_gguf(code).ok_or_else(|| {
                invalid(
                    path,
                    keys::TOKEN_TYPE,
                    format!("token {id} has type {code}; known types are 0 to 6"),
                )
            })
        })
        .collect()
}

fn read_scores(gguf: &GgufFile, n_vocab: usize) -> Result<Vec<f32>, TokenizerError> {
    let Some(value) = gguf.get(keys::SCORES) else {
        return Ok(vec![0.0; n_vocab]);
    };
    let is_integer = value
        .as_array()
        .and_then(|items| items.first())
        .is_some_and(|first| first.as_i128().is_some());
    let scores = if is_integer {
        gguf.get_i32_array(keys::SCORES)?
            .into_iter()
            .map(|score| score as f32)
            .collect()
    } else {
        gguf.get_f32_array(keys::SCORES)?
    };
    if scores.len() < n_vocab {
        return Err(invalid(
            gguf.path.as_path(),
            keys::SCORES,
            format!("has {} entries for {n_vocab} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

fn optional_str<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match gguf.get(key) {
        Some(_) => Ok(Some(gguf.get_str(key)?)),
        None => Ok(None),
    }
}

fn optional_bool(gguf: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match gguf.get(key) {
        Some(_) => Ok(Some(gguf.get_bool(key)?)),
        None => Ok(None),
    }
}

/// An optional token-id key; present but outside the vocabulary is an error.
fn optional_token_id(
    gguf: &GgufFile,
    key: &str,
    n_vocab: usize,
) -> Result<Option<u32>, TokenizerError> {
    if gguf.get(key).is_none() {
        return Ok(None);
    }
    let id = gguf.get_u32(key)?;
    if id as usize >= n_vocab {
        return Err(invalid(
            gguf.path.as_path(),
            key,
            format!("token id {id} is outside the vocabulary of {n_vocab} tokens"),
        ));
    }
    Ok(Some(id))
}

// ---------------------------------------------------------------------------------------
// tokenizer.json helpers

fn read_sibling_json(tokenizer_json: &Path, name: &str) -> Result<Option<Json>, TokenizerError> {
    let path = tokenizer_json.with_file_name(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizerError::Read { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::BadTokenizerJson {
            path,
            problem: format!("invalid JSON: {e}"),
        })
}

/// Whether a (possibly nested `Sequence`) component has an entry of the given `type`.
fn json_has_type(component: &Json, wanted: &str) -> bool {
    match component {
        Json::Object(map) => {
            map.get("type").and_then(Json::as_str) == Some(wanted)
                || map.values().any(|v| json_has_type(v, wanted))
        }
        Json::Array(items) => items.iter().any(|v| json_has_type(v, wanted)),
        _ => false,
    }
}

/// Whether a SentencePiece-style decoder takes the leading space off (`Strip` with
/// `start >= 1`, or `Metaspace` with a prefix space).
fn json_strips_leading_space(component: &Json) -> bool {
    match component {
        Json::Object(map) => {
            let kind = map.get("type").and_then(Json::as_str);
            let strips = match kind {
                Some("Strip") => map.get("start").and_then(Json::as_u64).unwrap_or(0) >= 1,
                Some("Metaspace") => {
                    map.get("add_prefix_space").and_then(Json::as_bool) == Some(true)
                        || map
                            .get("prepend_scheme")
                            .and_then(Json::as_str)
                            .is_some_and(|scheme| scheme != "never")
                }
                _ => false,
            };
            strips || map.values().any(json_strips_leading_space)
        }
        Json::Array(items) => items.iter().any(json_strips_leading_space),
        _ => false,
    }
}

/// The special token a `TemplateProcessing` post-processor puts before `$A`, if any.
fn first_template_special(post_processor: Option<&Json>) -> Option<String> {
    let processor = post_processor?;
    match processor.get("type").and_then(Json::as_str) {
        Some("TemplateProcessing") => {
            let first = processor.get("single")?.as_array()?.first()?;
            first
                .pointer("/SpecialToken/id")
                .and_then(Json::as_str)
                .map(str::to_owned)
        }
        Some("Sequence") => processor
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(|p| first_template_special(Some(p))),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is used.
fn chat_template_from_config(value: &Json) -> Option<String> {
    match value {
        Json::String(template) => Some(template.clone()),
        Json::Array(named) => {
            let template_of = |entry: &Json| entry.get("template")?.as_str().map(str::to_owned);
            named
                .iter()
                .find(|entry| entry.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(template_of)
                .or_else(|| named.first().and_then(template_of))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Token bytes

/// GPT-2's reversible byte ↔ printable character map: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes take the characters from U+0100 on, in byte order.
struct ByteMap {
    char_to_byte: HashMap<char, u8>,
}

impl ByteMap {
    fn new() -> Self {
        let stands_for_itself = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut char_to_byte = HashMap::with_capacity(256);
        let mut next_stand_in = 0x100u32;
        for byte in 0..=255u8 {
            let ch = if stands_for_itself(byte) {
                char::from(byte)
            } else {
                let ch = char::from_u32(next_stand_in).unwrap_or(char::REPLACEMENT_CHARACTER);
                next_stand_in += 1;
                ch
            };
            char_to_byte.insert(ch, byte);
        }
        ByteMap { char_to_byte }
    }

    /// Vocabulary string → bytes. A character outside the map (not produced by the byte
    /// map, so only in hand-made vocabularies) is kept as its own UTF-8.
    fn decode(&self, text: &str) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(text.len());
        for ch in text.chars() {
            match self.char_to_byte.get(&ch) {
                Some(&byte) => bytes.push(byte),
                None => {
                    let mut buf = [0u8; 4];
                    bytes.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        bytes
    }
}

fn piece_bytes_of(text: &str, kind: TokenKind, style: VocabStyle, byte_map: &ByteMap) -> Box<[u8]> {
    let bytes = match kind {
        // Added tokens are stored as the text they match.
        TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
            text.as_bytes().to_vec()
        }
        TokenKind::Byte => match parse_byte_token(text) {
            Some(byte) => vec![byte],
            None => text.as_bytes().to_vec(),
        },
        // llama.cpp renders these as nothing.
        TokenKind::Unused | TokenKind::Undefined => Vec::new(),
        TokenKind::Normal => match style {
            VocabStyle::ByteLevel => byte_map.decode(text),
            VocabStyle::SentencePiece { .. } => text.replace('▁', " ").into_bytes(),
        },
    };
    bytes.into_boxed_slice()
}

/// `<0x0A>` → 10.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_io::gguf::{GgufWriter, MetaValue};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A GGUF file in the temp folder, removed when dropped.
    struct TempGguf(PathBuf);

    impl TempGguf {
        fn write(metadata: Vec<(&str, MetaValue)>) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "edgefusion-tokenizer-{}-{}.gguf",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let mut writer = GgufWriter::new();
            for (key, value) in metadata {
                writer.add_metadata(key, value);
            }
            writer.write(&path).expect("write test GGUF");
            TempGguf(path)
        }

        fn open(&self) -> GgufFile {
            GgufFile::open(&self.0).expect("open test GGUF")
        }
    }

    impl Drop for TempGguf {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String((*s).to_owned()))
                .collect(),
        )
    }

    fn ints(items: &[i32]) -> MetaValue {
        MetaValue::Array(items.iter().map(|&v| MetaValue::I32(v)).collect())
    }

    /// A byte-level vocabulary: the 256 byte characters, a few merges, two control tokens.
    fn tiny_byte_level(pre: Option<&str>) -> Vec<(&'static str, MetaValue)> {
        byte_level_with(pre, &[])
    }

    /// The 256 byte characters, six merged tokens, `<|im_start|>` (BOS) and `<|im_end|>`
    /// (EOS) as control tokens, then `extra` (text, GGUF token type).
    fn byte_level_with(pre: Option<&str>, extra: &[(&str, i32)]) -> Vec<(&'static str, MetaValue)> {
        let byte_map = ByteMap::new();
        let mut by_byte: Vec<(u8, char)> = byte_map
            .char_to_byte
            .iter()
            .map(|(&c, &b)| (b, c))
            .collect();
        by_byte.sort_unstable();
        let mut tokens: Vec<String> = by_byte.iter().map(|(_, c)| c.to_string()).collect();
        let mut types = vec![1; tokens.len()];
        for merged in ["he", "ll", "llo", "hello", "Ġw", "Ġwo"] {
            tokens.push(merged.to_owned());
            types.push(1);
        }
        let bos = tokens.len() as u32;
        for (text, kind) in [("<|im_start|>", 3), ("<|im_end|>", 3)].iter().chain(extra) {
            tokens.push((*text).to_owned());
            types.push(*kind);
        }
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut metadata = vec![
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&token_refs)),
            ("tokenizer.ggml.token_type", ints(&types)),
            (
                "tokenizer.ggml.merges",
                strings(&["h e", "l l", "ll o", "he llo", "Ġ w", "Ġw o"]),
            ),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(bos)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(bos + 1)),
        ];
        if let Some(pre) = pre {
            metadata.push(("tokenizer.ggml.pre", MetaValue::String(pre.into())));
        }
        metadata
    }

    #[test]
    fn byte_level_encode_decode_and_special_tokens() {
        let file = TempGguf::write(tiny_byte_level(Some("gpt-2")));
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        let n = tokenizer.vocab_size() as u32;
        let hello = tokenizer.token_id("hello").unwrap();
        let ids = tokenizer.encode("<|im_start|>hello wo", true).unwrap();
        // gpt2 defaults to no BOS; the control token is matched whole.
        assert_eq!(tokenizer.bos_id(), Some(n - 2));
        assert_eq!(ids[0], n - 2);
        assert_eq!(ids[1], hello);
        assert_eq!(ids[2], tokenizer.token_id("Ġwo").unwrap());
        assert_eq!(ids.len(), 3);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "<|im_start|>hello wo");
        assert_eq!(tokenizer.decode_with(&ids, true).unwrap(), "hello wo");
        assert_eq!(tokenizer.eos_ids()[0], n - 1);
        assert!(!tokenizer.add_bos());
    }

    #[test]
    fn llama_cpp_type_corrections() {
        // `</s>` stored as an ordinary token still ends generation and is matched whole;
        // a FIM marker becomes a control token; gpt-oss `<|end|>` is not an end of
        // generation when `<|return|>` and `<|call|>` exist.
        let file = TempGguf::write(byte_level_with(
            Some("gpt-2"),
            &[
                ("</s>", 1),
                ("<|fim_prefix|>", 1),
                ("<|end|>", 3),
                ("<|return|>", 3),
                ("<|call|>", 3),
                ("<|channel|>", 3),
            ],
        ));
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        let id = |text: &str| tokenizer.token_id(text).unwrap();
        assert_eq!(tokenizer.token_kind(id("</s>")), Some(TokenKind::Control));
        assert_eq!(
            tokenizer.encode("hello</s><|fim_prefix|>", false).unwrap(),
            vec![id("hello"), id("</s>"), id("<|fim_prefix|>")]
        );
        assert_eq!(
            tokenizer.eos_ids(),
            &[
                id("<|im_end|>"),
                id("</s>"),
                id("<|return|>"),
                id("<|call|>")
            ]
        );
        assert_eq!(
            tokenizer.token_kind(id("<|end|>")),
            Some(TokenKind::UserDefined)
        );
        // User-defined tokens stay visible when special tokens are hidden.
        let ids = [id("<|channel|>"), id("hello"), id("<|im_end|>")];
        assert_eq!(
            tokenizer.decode_with(&ids, true).unwrap(),
            "<|channel|>hello"
        );
    }

    #[test]
    fn phi3_special_tokens_eat_the_whitespace_after_them() {
        let mut metadata = tiny_sentencepiece();
        for (key, value) in metadata.iter_mut() {
            if *key == keys::TOKENS {
                if let MetaValue::Array(items) = value {
                    items.push(MetaValue::String("<|end|>".into()));
                }
            }
            if *key == keys::TOKEN_TYPE {
                if let MetaValue::Array(items) = value {
                    items.push(MetaValue::I32(3));
                }
            }
            if *key == keys::SCORES {
                if let MetaValue::Array(items) = value {
                    items.push(MetaValue::F32(0.0));
                }
            }
        }
        let plain = TempGguf::write(metadata.clone());
        metadata.push((keys::GENERAL_NAME, MetaValue::String("Phi-3 Mini".into())));
        let phi3 = TempGguf::write(metadata);
        let plain = Tokenizer::from_gguf(&plain.open()).unwrap();
        let phi3 = Tokenizer::from_gguf(&phi3.open()).unwrap();
        let end = phi3.token_id("<|end|>").unwrap();
        let hello = phi3.token_id("▁hello").unwrap();
        let space = phi3.token_id("▁").unwrap();
        // After a special token SentencePiece adds its prefix space again: " hello".
        assert_eq!(
            phi3.encode("<|end|>\n hello", false).unwrap(),
            vec![end, hello]
        );
        assert_eq!(
            plain.encode("<|end|> hello", false).unwrap(),
            vec![end, space, hello]
        );
    }

    #[test]
    fn streamer_holds_back_split_characters() {
        let file = TempGguf::write(tiny_byte_level(Some("gpt-2")));
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        // "é" is two bytes, each its own token in this vocabulary.
        let ids = tokenizer.encode("hé!", false).unwrap();
        assert_eq!(ids.len(), 4);
        let mut streamer = tokenizer.streamer();
        let pieces: Vec<Option<String>> =
            ids.iter().map(|&id| streamer.push(id).unwrap()).collect();
        assert_eq!(
            pieces,
            vec![Some("h".into()), None, Some("é".into()), Some("!".into())]
        );
        assert_eq!(streamer.finish(), None);

        // A lone lead byte at the end becomes one replacement character, as in decode().
        let lead = ids[1];
        let mut streamer = tokenizer.streamer();
        assert_eq!(streamer.push(lead).unwrap(), None);
        assert_eq!(streamer.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(tokenizer.decode(&[lead]).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let file = TempGguf::write(tiny_byte_level(None));
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        let n = tokenizer.vocab_size() as u32;
        let err = tokenizer.decode(&[0, n]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::TokenOutOfRange { id, vocab_size } if id == n && vocab_size == n as usize),
            "{err}"
        );
        assert!(tokenizer.streamer().push(u32::MAX).is_err());
    }

    #[test]
    fn missing_pre_uses_default_regexes() {
        let file = TempGguf::write(tiny_byte_level(None));
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        assert_eq!(tokenizer.pre_tokenizer(), Some("default"));
    }

    #[test]
    fn gguf_without_tokenizer_keys_names_the_key() {
        let file = TempGguf::write(vec![(
            "general.architecture",
            MetaValue::String("llama".into()),
        )]);
        let err = Tokenizer::from_gguf(&file.open()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("tokenizer.ggml.model"), "{message}");
    }

    #[test]
    fn missing_merges_is_an_error_naming_the_key() {
        let metadata: Vec<_> = tiny_byte_level(Some("gpt-2"))
            .into_iter()
            .filter(|(key, _)| *key != keys::MERGES)
            .collect();
        let file = TempGguf::write(metadata);
        let message = Tokenizer::from_gguf(&file.open()).unwrap_err().to_string();
        assert!(message.contains("tokenizer.ggml.merges"), "{message}");
    }

    #[test]
    fn malformed_merge_is_an_error() {
        let mut metadata = tiny_byte_level(Some("gpt-2"));
        for (key, value) in metadata.iter_mut() {
            if *key == keys::MERGES {
                *value = strings(&["h e", "nospace"]);
            }
        }
        let file = TempGguf::write(metadata);
        let message = Tokenizer::from_gguf(&file.open()).unwrap_err().to_string();
        assert!(message.contains("merge 1 `nospace`"), "{message}");
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let file = TempGguf::write(tiny_byte_level(Some("no-such-pre")));
        let err = Tokenizer::from_gguf(&file.open()).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::UnknownPreTokenizer { pre, .. } if pre == "no-such-pre"),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.ggml.pre"));
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let mut metadata = tiny_byte_level(None);
        metadata[0].1 = MetaValue::String("bert".into());
        let file = TempGguf::write(metadata);
        let err = Tokenizer::from_gguf(&file.open()).unwrap_err();
        assert!(err.to_string().contains("`bert`"), "{err}");
    }

    #[test]
    fn bad_special_ids_and_type_arrays_are_errors() {
        let mut metadata = tiny_byte_level(Some("gpt-2"));
        metadata.push((keys::PAD_ID, MetaValue::U32(1_000_000)));
        let file = TempGguf::write(metadata);
        let message = Tokenizer::from_gguf(&file.open()).unwrap_err().to_string();
        assert!(message.contains(keys::PAD_ID), "{message}");

        let mut metadata = tiny_byte_level(Some("gpt-2"));
        for (key, value) in metadata.iter_mut() {
            if *key == keys::TOKEN_TYPE {
                *value = ints(&[1, 1, 1]);
            }
        }
        let file = TempGguf::write(metadata);
        let message = Tokenizer::from_gguf(&file.open()).unwrap_err().to_string();
        assert!(message.contains(keys::TOKEN_TYPE), "{message}");
    }

    #[test]
    fn sentencepiece_vocabulary_from_scores() {
        let file = TempGguf::write(tiny_sentencepiece());
        let tokenizer = Tokenizer::from_gguf(&file.open()).unwrap();
        assert!(tokenizer.add_bos());
        let ids = tokenizer.encode("hello é", true).unwrap();
        let hello = tokenizer.token_id("▁hello").unwrap();
        let space = tokenizer.token_id("▁").unwrap();
        // BOS, "▁hello", "▁", then é as its two UTF-8 bytes through byte fallback.
        assert_eq!(ids, vec![1, hello, space, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tokenizer.decode(&ids[1..]).unwrap(), "hello é");
        assert_eq!(tokenizer.decode_with(&ids, true).unwrap(), " hello é");
    }

    /// A folder in the temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "edgefusion-tokenizer-json-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tiny_sentencepiece() -> Vec<(&'static str, MetaValue)> {
        let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
        tokens.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
        for piece in ["▁", "h", "e", "l", "o", "▁h", "el", "▁hel", "lo", "▁hello"] {
            tokens.push(piece.to_owned());
        }
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut types = vec![2, 3, 3];
        types.extend([6; 256]);
        types.extend([1; 10]);
        let scores: Vec<MetaValue> = (0..tokens.len())
            .map(|i| MetaValue::F32(-(i as f32)))
            .collect();
        vec![
            ("tokenizer.ggml.model", MetaValue::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&token_refs)),
            ("tokenizer.ggml.token_type", ints(&types)),
            ("tokenizer.ggml.scores", MetaValue::Array(scores)),
        ]
    }

    #[test]
    fn tokenizer_json_round_trip_with_config() {
        let file = TempGguf::write(tiny_sentencepiece());
        let from_gguf = Tokenizer::from_gguf(&file.open()).unwrap();
        let dir = TempDir::new();
        let json_path = dir.write("tokenizer.json", &from_gguf.to_tokenizer_json().unwrap());

        // Without tokenizer_config.json nothing says which token is BOS.
        let bare = Tokenizer::from_tokenizer_json(&json_path).unwrap();
        assert_eq!(bare.bos_id(), None);
        assert!(!bare.add_bos());

        dir.write(
            "tokenizer_config.json",
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true,
                "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}"#,
        );
        let from_json = Tokenizer::from_tokenizer_json(&json_path).unwrap();
        assert_eq!(
            from_json.style(),
            VocabStyle::SentencePiece {
                add_space_prefix: true
            }
        );
        assert_eq!(from_json.vocab_size(), from_gguf.vocab_size());
        assert_eq!(from_json.bos_id(), Some(1));
        assert_eq!(from_json.eos_ids(), &[2]);
        assert_eq!(from_json.unk_id(), Some(0));
        assert_eq!(from_json.token_kind(3), Some(TokenKind::Byte));
        assert_eq!(
            from_json.chat_template(),
            Some("{{ bos_token }}{{ messages[0]['content'] }}")
        );
        for text in ["hello é", "hello</s>hello", ""] {
            let ids = from_gguf.encode(text, true).unwrap();
            assert_eq!(from_json.encode(text, true).unwrap(), ids, "{text:?}");
            assert_eq!(
                from_json.decode(&ids).unwrap(),
                from_gguf.decode(&ids).unwrap()
            );
        }
    }

    #[test]
    fn bad_tokenizer_json_files_are_errors() {
        let dir = TempDir::new();
        let missing = dir.0.join("tokenizer.json");
        let err = Tokenizer::from_tokenizer_json(&missing).unwrap_err();
        assert!(matches!(err, TokenizerError::Read { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        let not_json = dir.write("tokenizer.json", "{ not json");
        let err = Tokenizer::from_tokenizer_json(&not_json).unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");

        let word_piece = dir.write(
            "tokenizer.json",
            r#"{"model": {"type": "WordPiece", "vocab": {}}}"#,
        );
        let err = Tokenizer::from_tokenizer_json(&word_piece).unwrap_err();
        assert!(err.to_string().contains("`WordPiece`"), "{err}");

        // Valid for the `tokenizers` crate, but its ids would have us allocate for 100001.
        let sparse = dir.write(
            "tokenizer.json",
            r#"{"added_tokens": [],
                "decoder": {"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": false, "use_regex": false},
                "model": {"type": "BPE", "vocab": {"a": 0, "b": 100000}, "merges": []}}"#,
        );
        let err = Tokenizer::from_tokenizer_json(&sparse).unwrap_err();
        assert!(err.to_string().contains("nearly contiguous"), "{err}");

        // A BPE file that the `tokenizers` crate itself rejects.
        let broken = dir.write("tokenizer.json", r#"{"model": {"type": "BPE"}}"#);
        let err = Tokenizer::from_tokenizer_json(&broken).unwrap_err();
        assert!(
            matches!(err, TokenizerError::BadTokenizerJson { .. }),
            "{err}"
        );
    }

    #[test]
    fn every_listed_pre_tokenizer_compiles() {
        let names = [
            "default",
            "llama3",
            "llama-bpe",
            "dbrx",
            "jais-2",
            "deepseek-llm",
            "deepseek-v3",
            "deepseek-coder",
            "falcon",
            "smollm",
            "gpt-2",
            "qwen2",
            "qwen35",
            "ufakzeka",
            "laguna",
            "bloom",
            "viking",
            "chatglm-bpe",
            "glm4",
            "tekken",
            "gpt-4o",
            "seed-coder",
            "bailingmoe",
            "exaone-moe",
            "minicpm5",
        ];
        for name in names {
            let spec = bpe_pre_spec(name).unwrap_or_else(|| panic!("{name} missing"));
            for regex in spec.regexes {
                Split::new(
                    SplitPattern::Regex((*regex).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{name}: `{regex}`: {e}"));
            }
        }
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let map = ByteMap::new();
        assert_eq!(map.char_to_byte.len(), 256);
        assert_eq!(map.decode("Ġ"), vec![b' ']);
        assert_eq!(map.decode("Ċ"), vec![b'\n']);
        assert_eq!(map.decode("A"), vec![b'A']);
    }
}
