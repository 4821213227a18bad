//! The SSM mixer of hybrid layers at inference (the selective SSM of docs/HYBRID.md):
//! causal depthwise convolution and SiLU over the C, B and x projections, then the
//! selective scan, token by token, over a state whose size does not grow with the context.
//!
//! Per token t and KV group j (query heads `i` of the group read its state):
//!
//! ```text
//! Δ = softplus(dt_t[j] + dt_bias[j])      a = exp(−Δ · A[j])      g = 2σ(gate_t[j])
//! S_j ← a · S_j + Δ · b_t[j] ⊗ x_t[j]                      S_j: (N, head_dim)
//! y_t[i] = g · (c_t[i]ᵀ S_j / √N + D[i] · x_t[j])
//! ```

use edgefusion_model::{ModelConfig, Ssm};

use super::MixerIo;
use crate::engine::LinearInput;

/// The recurrent state of one SSM layer, `ModelConfig::ssm_state_floats` floats whatever the
/// context length: the `(n_kv_heads, N, head_dim)` state matrices, then the convolution's
/// last `d_conv − 1` inputs `(d_conv − 1, channels)`, oldest first.
#[derive(Debug, Clone)]
pub struct SsmState {
    pub(crate) values: Vec<f32>,
}

impl SsmState {
    pub(crate) fn new(cfg: &ModelConfig) -> Self {
        SsmState {
            values: vec![0.0; cfg.ssm_state_floats()],
        }
    }

    /// The state before any token.
    pub(crate) fn clear(&mut self) {
        self.values.fill(0.0);
    }

    pub(crate) fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>()
    }
}

/// Scratch of the SSM mixer for one step of up to `max_batch` tokens.
pub(crate) struct SsmScratch {
    /// (max_batch, n_heads · N)
    c: Vec<f32>,
    /// (max_batch, n_kv_heads · N)
    b: Vec<f32>,
    /// (max_batch, kv_dim)
    x: Vec<f32>,
    /// (max_batch, n_kv_heads): Δ before its bias and softplus
    dt: Vec<f32>,
    /// (max_batch, n_kv_heads): the gate before `2σ`
    gate: Vec<f32>,
    /// The gated read-out entering the output projection: (max_batch, q_dim)
    y: Vec<f32>,
}

impl SsmScratch {
    /// Scratch for `cfg`'s SSM (empty when the model has no SSM layer).
    pub(crate) fn new(cfg: &ModelConfig, max_batch: usize) -> Self {
        let rows = if cfg.count_layers(edgefusion_model::LayerType::Ssm) > 0 {
            max_batch
        } else {
            0
        };
        let n = cfg.ssm_d_state;
        SsmScratch {
            c: vec![0.0; rows * cfg.n_heads * n],
            b: vec![0.0; rows * cfg.n_kv_heads * n],
            x: vec![0.0; rows * cfg.kv_dim()],
            dt: vec![0.0; rows * cfg.n_kv_heads],
            gate: vec![0.0; rows * cfg.n_kv_heads],
            y: vec![0.0; rows * cfg.q_dim()],
        }
    }
}

/// The SSM of layer `io.layer`: projections of the step's input, the scan continuing from
/// `state`, and the output projection into `out (n_tok, d_model)`.
pub(crate) fn forward(
    io: &mut MixerIo<'_>,
    w: &Ssm<'_>,
    state: &mut SsmState,
    scratch: &mut SsmScratch,
    out: &mut [f32],
) {
    project(io, w, scratch);
    scan_rows(io.cfg, w, scratch, state, 0..io.n_tok);
    project_out(io, w, scratch, out);
}

/// The C, B, x, Δ and gate projections of every row of the step's input (rows of several
/// sequences in a batched step: one matmul each over all of them).
pub(crate) fn project(io: &mut MixerIo<'_>, w: &Ssm<'_>, scratch: &mut SsmScratch) {
    io.observe(LinearInput::Ssm { layer: io.layer }, io.xn, io.cfg.d_model);
    for (lin, dst) in [
        (&w.wc, &mut scratch.c),
        (&w.wb, &mut scratch.b),
        (&w.wx, &mut scratch.x),
        (&w.wdt, &mut scratch.dt),
        (&w.wgate, &mut scratch.gate),
    ] {
        io.linear_of_input(lin, dst);
    }
}

/// The scan of step rows `rows` (one sequence's, after [`project`]) continuing from `state`:
/// their gated read-out into the scratch's `y`.
pub(crate) fn scan_rows(
    cfg: &ModelConfig,
    w: &Ssm<'_>,
    scratch: &mut SsmScratch,
    state: &mut SsmState,
    rows: std::ops::Range<usize>,
) {
    let n = cfg.ssm_d_state;
    let (groups, n_tok) = (cfg.n_kv_heads, rows.len());
    let span = |width: usize| rows.start * width..rows.end * width;
    let projections = Projections {
        c: &mut scratch.c[span(cfg.n_heads * n)],
        b: &mut scratch.b[span(groups * n)],
        x: &mut scratch.x[span(cfg.kv_dim())],
        dt: &scratch.dt[span(groups)],
        gate: &scratch.gate[span(groups)],
    };
    scan(
        cfg,
        w,
        projections,
        &mut state.values,
        n_tok,
        &mut scratch.y[span(cfg.q_dim())],
    );
}

/// The output projection of every row's read-out into `out (n_tok, d_model)`.
pub(crate) fn project_out(
    io: &mut MixerIo<'_>,
    w: &Ssm<'_>,
    scratch: &SsmScratch,
    out: &mut [f32],
) {
    let q_dim = io.cfg.q_dim();
    io.observe(
        LinearInput::SsmOutput { layer: io.layer },
        &scratch.y,
        q_dim,
    );
    io.linear(&w.wo, &scratch.y, out);
}

/// An SSM layer's projections of a batch of tokens.
pub struct Projections<'a> {
    /// (n_tok, n_heads · N), (n_tok, n_kv_heads · N), (n_tok, kv_dim): the C, B and x
    /// projections; the scan overwrites them with their convolved, activated values.
    pub c: &'a mut [f32],
    pub b: &'a mut [f32],
    pub x: &'a mut [f32],
    /// (n_tok, n_kv_heads): Δ before its bias and softplus, the gate before `2σ`.
    pub dt: &'a [f32],
    pub gate: &'a [f32],
}

/// Runs `n_tok` tokens through the SSM of one layer, continuing from `state`
/// (`cfg.ssm_state_floats()`: the `(n_kv_heads, N, head_dim)` state matrices, then the
/// convolution's last `d_conv − 1` inputs `(d_conv − 1, channels)`, oldest first), and
/// writes the gated read-out `(n_tok, q_dim)` into `out`.
pub fn scan(
    cfg: &ModelConfig,
    w: &Ssm<'_>,
    p: Projections<'_>,
    state: &mut [f32],
    n_tok: usize,
    out: &mut [f32],
) {
    let (n, hd, groups, k) = (
        cfg.ssm_d_state,
        cfg.head_dim,
        cfg.n_kv_heads,
        cfg.ssm_d_conv,
    );
    let (n_heads, group) = (cfg.n_heads, cfg.gqa_group());
    let channels = cfg.ssm_channels();
    let (mats, history) = state.split_at_mut(groups * n * hd);
    let widths = [n_heads * n, groups * n, cfg.kv_dim()];
    let scale = 1.0 / (n as f32).sqrt();
    let Projections { c, b, x, dt, gate } = p;
    for t in 0..n_tok {
        // Convolution over time, then SiLU, channel by channel in the order C, B, x.
        let mut ch0 = 0;
        for (buf, width) in [
            (&mut *c, widths[0]),
            (&mut *b, widths[1]),
            (&mut *x, widths[2]),
        ] {
            for (i, v) in buf[t * width..(t + 1) * width].iter_mut().enumerate() {
                let ch = ch0 + i;
                let taps = &w.conv[ch * k..(ch + 1) * k];
                let mut acc = taps[k - 1] * *v;
                for (j, &tap) in taps[..k - 1].iter().enumerate() {
                    acc += tap * history[j * channels + ch];
                }
                for j in 0..k.saturating_sub(2) {
                    history[j * channels + ch] = history[(j + 1) * channels + ch];
                }
                if k > 1 {
                    history[(k - 2) * channels + ch] = *v;
                }
                *v = silu(acc);
            }
            ch0 += width;
        }
        // The scan, group by group.
        for j in 0..groups {
            let delta = softplus(dt[t * groups + j] + w.dt_bias[j]);
            let decay = (-delta * w.a_log[j].exp()).exp();
            let g = 2.0 / (1.0 + (-gate[t * groups + j]).exp());
            let s = &mut mats[j * n * hd..(j + 1) * n * hd];
            let b_j = &b[(t * groups + j) * n..][..n];
            let x_j = &x[t * cfg.kv_dim() + j * hd..][..hd];
            for (s_row, &b_r) in s.chunks_exact_mut(hd).zip(b_j) {
                let db = delta * b_r;
                for (s_v, &x_v) in s_row.iter_mut().zip(x_j) {
                    *s_v = decay * *s_v + db * x_v;
                }
            }
            for h in j * group..(j + 1) * group {
                let c_h = &c[(t * n_heads + h) * n..][..n];
                let y = &mut out[t * cfg.q_dim() + h * hd..][..hd];
                for (y_v, &x_v) in y.iter_mut().zip(x_j) {
                    *y_v = w.d[h] * x_v;
                }
                for (s_row, &c_r) in s.chunks_exact(hd).zip(c_h) {
                    let cs = c_r * scale;
                    for (y_v, &s_v) in y.iter_mut().zip(s_row) {
                        *y_v += cs * s_v;
                    }
                }
                for y_v in y.iter_mut() {
                    *y_v *= g;
                }
            }
        }
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `ln(1 + eˣ)`, exact to f32 for large x.
fn softplus(v: f32) -> f32 {
    if v > 20.0 {
        v
    } else {
        v.exp().ln_1p()
    }
}
