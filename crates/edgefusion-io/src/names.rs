//! The one table of tensor names: each weight of a Llama-family model by role, with its
//! GGUF name (llama.cpp's `llama-arch.cpp` spelling) and its Hugging Face name.

/// What a weight does in the model. Per-layer roles take the layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorRole {
    TokenEmbd,
    OutputNorm,
    Output,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    /// Qwen2 only.
    AttnQBias,
    AttnKBias,
    AttnVBias,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    /// SSM mixer of a hybrid layer (docs/HYBRID.md): C, B and x projections.
    SsmC,
    SsmB,
    SsmX,
    /// Step size Δ projection and bias, decay rates `log A`, skip `D`.
    SsmDt,
    SsmDtBias,
    SsmALog,
    SsmD,
    /// Output gate projection.
    SsmGate,
    /// Causal depthwise convolution `(channels, d_conv)`.
    SsmConv,
    SsmOut,
    /// RMS norm weights `(head_dim)` of every query and key head before RoPE (Qwen3, Gemma 3).
    AttnQNorm,
    AttnKNorm,
    /// RMS norm weights `(d_model)` of the attention's and the feed-forward's outputs before
    /// the residual add (Gemma 3).
    AttnPostNorm,
    FfnPostNorm,
}

/// One row of the table: role, GGUF name (after `blk.{i}.` when per layer), Hugging Face
/// name (after `model.layers.{i}.` when per layer), short group name.
struct NameRow {
    role: TensorRole,
    per_layer: bool,
    gguf: &'static str,
    hf: &'static str,
    short: &'static str,
}

const GGUF_LAYER_PREFIX: &str = "blk.";
const HF_LAYER_PREFIX: &str = "model.layers.";

#[rustfmt::skip]
const TABLE: [NameRow; 29] = [
    NameRow { role: TensorRole::TokenEmbd,  per_layer: false, gguf: "token_embd.weight",  hf: "model.embed_tokens.weight",             short: "token_embd" },
    NameRow { role: TensorRole::OutputNorm, per_layer: false, gguf: "output_norm.weight", hf: "model.norm.weight",                     short: "output_norm" },
    NameRow { role: TensorRole::Output,     per_layer: false, gguf: "output.weight",      hf: "lm_head.weight",                        short: "output" },
    NameRow { role: TensorRole::AttnNorm,   per_layer: true,  gguf: "attn_norm.weight",   hf: "input_layernorm.weight",                short: "attn_norm" },
    NameRow { role: TensorRole::AttnQ,      per_layer: true,  gguf: "attn_q.weight",      hf: "self_attn.q_proj.weight",               short: "attn_q" },
    NameRow { role: TensorRole::AttnK,      per_layer: true,  gguf: "attn_k.weight",      hf: "self_attn.k_proj.weight",               short: "attn_k" },
    NameRow { role: TensorRole::AttnV,      per_layer: true,  gguf: "attn_v.weight",      hf: "self_attn.v_proj.weight",               short: "attn_v" },
    NameRow { role: TensorRole::AttnOutput, per_layer: true,  gguf: "attn_output.weight", hf: "self_attn.o_proj.weight",               short: "attn_output" },
    NameRow { role: TensorRole::AttnQBias,  per_layer: true,  gguf: "attn_q.bias",        hf: "self_attn.q_proj.bias",                 short: "attn_q_bias" },
    NameRow { role: TensorRole::AttnKBias,  per_layer: true,  gguf: "attn_k.bias",        hf: "self_attn.k_proj.bias",                 short: "attn_k_bias" },
    NameRow { role: TensorRole::AttnVBias,  per_layer: true,  gguf: "attn_v.bias",        hf: "self_attn.v_proj.bias",                 short: "attn_v_bias" },
    NameRow { role: TensorRole::FfnNorm,    per_layer: true,  gguf: "ffn_norm.weight",    hf: "post_attention_layernorm.weight",       short: "ffn_norm" },
    NameRow { role: TensorRole::FfnGate,    per_layer: true,  gguf: "ffn_gate.weight",    hf: "mlp.gate_proj.weight",                  short: "ffn_gate" },
    NameRow { role: TensorRole::FfnUp,      per_layer: true,  gguf: "ffn_up.weight",      hf: "mlp.up_proj.weight",                    short: "ffn_up" },
    NameRow { role: TensorRole::FfnDown,    per_layer: true,  gguf: "ffn_down.weight",    hf: "mlp.down_proj.weight",                  short: "ffn_down" },
    NameRow { role: TensorRole::SsmC,       per_layer: true,  gguf: "ssm_c.weight",       hf: "ssm.c_proj.weight",                     short: "ssm_c" },
    NameRow { role: TensorRole::SsmB,       per_layer: true,  gguf: "ssm_b.weight",       hf: "ssm.b_proj.weight",                     short: "ssm_b" },
    NameRow { role: TensorRole::SsmX,       per_layer: true,  gguf: "ssm_x.weight",       hf: "ssm.x_proj.weight",                     short: "ssm_x" },
    NameRow { role: TensorRole::SsmDt,      per_layer: true,  gguf: "ssm_dt.weight",      hf: "ssm.dt_proj.weight",                    short: "ssm_dt" },
    NameRow { role: TensorRole::SsmDtBias,  per_layer: true,  gguf: "ssm_dt.bias",        hf: "ssm.dt_proj.bias",                      short: "ssm_dt_bias" },
    NameRow { role: TensorRole::SsmALog,    per_layer: true,  gguf: "ssm_a_log",          hf: "ssm.A_log",                             short: "ssm_a_log" },
    NameRow { role: TensorRole::SsmD,       per_layer: true,  gguf: "ssm_d",              hf: "ssm.D",                                 short: "ssm_d" },
    NameRow { role: TensorRole::SsmGate,    per_layer: true,  gguf: "ssm_gate.weight",    hf: "ssm.gate_proj.weight",                  short: "ssm_gate" },
    NameRow { role: TensorRole::SsmConv,    per_layer: true,  gguf: "ssm_conv1d.weight",  hf: "ssm.conv1d.weight",                     short: "ssm_conv" },
    NameRow { role: TensorRole::SsmOut,     per_layer: true,  gguf: "ssm_out.weight",     hf: "ssm.out_proj.weight",                   short: "ssm_out" },
    NameRow { role: TensorRole::AttnQNorm,  per_layer: true,  gguf: "attn_q_norm.weight", hf: "self_attn.q_norm.weight",               short: "attn_q_norm" },
    NameRow { role: TensorRole::AttnKNorm,  per_layer: true,  gguf: "attn_k_norm.weight", hf: "self_attn.k_norm.weight",               short: "attn_k_norm" },
    // Gemma's Hugging Face folders call this `post_attention_layernorm`, Llama's name for the
    // feed-forward's input norm; reading them needs a per-architecture table (not yet).
    NameRow { role: TensorRole::AttnPostNorm, per_layer: true, gguf: "post_attention_norm.weight", hf: "self_attn.post_norm.weight", short: "attn_post_norm" },
    NameRow { role: TensorRole::FfnPostNorm, per_layer: true, gguf: "post_ffw_norm.weight", hf: "post_feedforward_layernorm.weight",   short: "ffn_post_norm" },
];

/// Group name for tensors that are not in the table.
pub const OTHER_GROUP: &str = "other";

impl TensorRole {
    pub const ALL: [TensorRole; 29] = [
        TensorRole::TokenEmbd,
        TensorRole::OutputNorm,
        TensorRole::Output,
        TensorRole::AttnNorm,
        TensorRole::AttnQ,
        TensorRole::AttnK,
        TensorRole::AttnV,
        TensorRole::AttnOutput,
        TensorRole::AttnQBias,
        TensorRole::AttnKBias,
        TensorRole::AttnVBias,
        TensorRole::FfnNorm,
        TensorRole::FfnGate,
        TensorRole::FfnUp,
        TensorRole::FfnDown,
        TensorRole::SsmC,
        TensorRole::SsmB,
        TensorRole::SsmX,
        TensorRole::SsmDt,
        TensorRole::SsmDtBias,
        TensorRole::SsmALog,
        TensorRole::SsmD,
        TensorRole::SsmGate,
        TensorRole::SsmConv,
        TensorRole::SsmOut,
        TensorRole::AttnQNorm,
        TensorRole::AttnKNorm,
        TensorRole::AttnPostNorm,
        TensorRole::FfnPostNorm,
    ];

    fn row(self) -> &'static NameRow {
        // TABLE is in declaration order; the test `table_is_in_role_order` holds us to it.
        &TABLE[self as usize]
    }

    /// Whether the role exists once per transformer block (and so needs a layer index).
    pub fn is_per_layer(self) -> bool {
        self.row().per_layer
    }

    /// Group name for per-role statistics (`attn_q`, `ffn_down`, ...).
    pub fn short(self) -> &'static str {
        self.row().short
    }

    /// The token embedding or the output head: the vocabulary-sized matrices.
    pub fn is_embedding_or_head(self) -> bool {
        matches!(self, TensorRole::TokenEmbd | TensorRole::Output)
    }

    /// GGUF name: `token_embd.weight`, `blk.3.attn_q.weight`. A per-layer role given no
    /// layer (a caller bug) yields `blk.?.…`, a name no file contains, rather than a guess.
    pub fn gguf_name(self, layer: Option<usize>) -> String {
        let row = self.row();
        layered_name(GGUF_LAYER_PREFIX, row.per_layer, row.gguf, layer)
    }

    /// Hugging Face name: `model.embed_tokens.weight`, `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf_name(self, layer: Option<usize>) -> String {
        let row = self.row();
        layered_name(HF_LAYER_PREFIX, row.per_layer, row.hf, layer)
    }
}

fn layered_name(prefix: &str, per_layer: bool, suffix: &str, layer: Option<usize>) -> String {
    match (per_layer, layer) {
        (false, _) => suffix.to_string(),
        (true, Some(i)) => format!("{prefix}{i}.{suffix}"),
        (true, None) => format!("{prefix}?.{suffix}"),
    }
}

/// Role and layer of a GGUF tensor name; `None` for names outside the table.
pub fn parse_gguf_name(name: &str) -> Option<(TensorRole, Option<usize>)> {
    parse_name(name, GGUF_LAYER_PREFIX, |row| row.gguf)
}

/// Role and layer of a Hugging Face tensor name; `None` for names outside the table.
pub fn parse_hf_name(name: &str) -> Option<(TensorRole, Option<usize>)> {
    parse_name(name, HF_LAYER_PREFIX, |row| row.hf)
}

/// The group a tensor name (GGUF or Hugging Face spelling) belongs to for per-role
/// statistics: the role's [`TensorRole::short`], or `"other"`.
pub fn group_of(name: &str) -> &'static str {
    parse_gguf_name(name)
        .or_else(|| parse_hf_name(name))
        .map_or(OTHER_GROUP, |(role, _)| role.short())
}

fn parse_name(
    name: &str,
    layer_prefix: &str,
    suffix_of: impl Fn(&NameRow) -> &'static str,
) -> Option<(TensorRole, Option<usize>)> {
    if let Some(row) = TABLE.iter().find(|r| !r.per_layer && suffix_of(r) == name) {
        return Some((row.role, None));
    }
    let rest = name.strip_prefix(layer_prefix)?;
    let (index, suffix) = rest.split_once('.')?;
    let layer = parse_canonical_index(index)?;
    TABLE
        .iter()
        .find(|r| r.per_layer && suffix_of(r) == suffix)
        .map(|r| (r.role, Some(layer)))
}

/// A layer index written the way we write it: digits only, no leading zero, so that
/// parsing and formatting round-trip (`usize::from_str` alone would accept `+1` and `01`).
fn parse_canonical_index(digits: &str) -> Option<usize> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_role_order() {
        for (i, role) in TensorRole::ALL.iter().enumerate() {
            assert_eq!(TABLE[i].role, *role);
            assert_eq!(*role as usize, i);
        }
    }

    #[test]
    fn names_round_trip_for_every_role() {
        for role in TensorRole::ALL {
            let layer = role.is_per_layer().then_some(17);
            let gguf = role.gguf_name(layer);
            let hf = role.hf_name(layer);
            assert_eq!(parse_gguf_name(&gguf), Some((role, layer)), "{gguf}");
            assert_eq!(parse_hf_name(&hf), Some((role, layer)), "{hf}");
            // The two spellings never collide.
            assert_eq!(parse_gguf_name(&hf), None, "{hf}");
            assert_eq!(parse_hf_name(&gguf), None, "{gguf}");
        }
    }

    #[test]
    fn known_spellings() {
        assert_eq!(TensorRole::AttnQ.gguf_name(Some(3)), "blk.3.attn_q.weight");
        assert_eq!(
            TensorRole::AttnQBias.gguf_name(Some(0)),
            "blk.0.attn_q.bias"
        );
        assert_eq!(
            TensorRole::FfnNorm.hf_name(Some(12)),
            "model.layers.12.post_attention_layernorm.weight"
        );
        assert_eq!(TensorRole::Output.hf_name(None), "lm_head.weight");
        assert_eq!(
            TensorRole::TokenEmbd.gguf_name(Some(4)),
            "token_embd.weight"
        );
        assert_eq!(TensorRole::AttnV.gguf_name(None), "blk.?.attn_v.weight");
        assert!(TensorRole::FfnDown.is_per_layer());
        assert!(!TensorRole::OutputNorm.is_per_layer());
    }

    #[test]
    fn rejects_names_outside_the_table() {
        for name in [
            "blk.01.attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk..attn_q.weight",
            "blk.3.attn_q",
            "blk.3.token_embd.weight",
            "blk.99999999999999999999999.attn_q.weight",
            "rope_freqs.weight",
            "",
        ] {
            assert_eq!(parse_gguf_name(name), None, "{name}");
        }
        assert_eq!(group_of("rope_freqs.weight"), "other");
        assert_eq!(group_of("blk.5.ffn_up.weight"), "ffn_up");
        assert_eq!(group_of("model.layers.5.mlp.up_proj.weight"), "ffn_up");
    }
}
