//! The token mixers of a decoder layer at inference, each with the state it keeps for a
//! sequence ([`LayerState`]):
//! - [`attention`]: softmax attention, full (a KV cache that grows with the context) or over
//!   a sink and a sliding window (a constant-size cache);
//! - [`ssm`]: the selective SSM (a constant-size recurrent state), alone or beside windowed
//!   attention, the two outputs added.
//!
//! A mixer reads the layer's normalized input `(n_tok, d_model)` and writes its output
//! `(n_tok, d_model)`, which the engine adds to the residual stream.

pub mod attention;
pub mod ssm;

use edgefusion_model::{Linear, Mixer, ModelConfig};

use crate::engine::{ActCache, LinearInput};
use crate::parallel::Threads;
use crate::rope::RopeTable;
use attention::{KvCache, KvType, WindowCache};
use ssm::SsmState;

/// What one layer keeps of a sequence between steps.
#[derive(Debug, Clone)]
pub(crate) enum LayerState {
    /// Full attention: keys and values of every position.
    Kv(KvCache),
    /// Sink + window attention: a constant-size cache.
    Window(WindowCache),
    /// The SSM's state, and the window cache when the layer attends over a window too.
    Ssm {
        ssm: SsmState,
        window: Option<WindowCache>,
    },
}

impl LayerState {
    /// The state `mixer` needs in a session of `n_ctx` positions and steps of `max_batch`.
    pub(crate) fn new(
        cfg: &ModelConfig,
        mixer: &Mixer<'_>,
        n_ctx: usize,
        max_batch: usize,
        kv_type: KvType,
    ) -> Self {
        match mixer {
            Mixer::Attention(_) => LayerState::Kv(KvCache::new(cfg, n_ctx, kv_type)),
            Mixer::Window(_) => LayerState::Window(WindowCache::new(cfg, max_batch, kv_type)),
            Mixer::Ssm { window, .. } => LayerState::Ssm {
                ssm: SsmState::new(cfg),
                window: window
                    .as_ref()
                    .map(|_| WindowCache::new(cfg, max_batch, kv_type)),
            },
        }
    }

    /// Whether the state summarizes the past in constant size (and so cannot be cut back to
    /// an earlier position, only saved and restored).
    pub(crate) fn is_recurrent(&self) -> bool {
        !matches!(self, LayerState::Kv(_))
    }

    /// A copy of the constant-size part (nothing for a full KV cache, which keeps its
    /// positions in place).
    pub(crate) fn save(&self, cfg: &ModelConfig) -> SavedLayer {
        match self {
            LayerState::Kv(_) => SavedLayer::Nothing,
            LayerState::Window(w) => SavedLayer::Window(w.save(cfg)),
            LayerState::Ssm { ssm, window } => {
                SavedLayer::Ssm(ssm.clone(), window.as_ref().map(|w| w.save(cfg)))
            }
        }
    }

    /// Returns to a copy made by [`LayerState::save`] of this layer.
    pub(crate) fn restore(&mut self, cfg: &ModelConfig, saved: &SavedLayer) {
        match (self, saved) {
            (LayerState::Kv(_), SavedLayer::Nothing) => {}
            (LayerState::Window(w), SavedLayer::Window(s)) => w.restore(cfg, s),
            (LayerState::Ssm { ssm, window }, SavedLayer::Ssm(saved_ssm, saved_window)) => {
                ssm.values.copy_from_slice(&saved_ssm.values);
                if let (Some(w), Some(s)) = (window, saved_window) {
                    w.restore(cfg, s);
                }
            }
            _ => unreachable!("a saved state is restored into the session that saved it"),
        }
    }

    /// Bytes of the state a sequence keeps in constant size (SSM state, sink and window).
    pub(crate) fn recurrent_bytes(&self, cfg: &ModelConfig) -> usize {
        match self {
            LayerState::Kv(_) => 0,
            LayerState::Window(w) => w.state_bytes(cfg),
            LayerState::Ssm { ssm, window } => {
                ssm.bytes() + window.as_ref().map_or(0, |w| w.state_bytes(cfg))
            }
        }
    }
}

/// A copy of one layer's constant-size state ([`LayerState::save`]).
#[derive(Debug, Clone)]
pub(crate) enum SavedLayer {
    Nothing,
    Window(KvCache),
    Ssm(SsmState, Option<KvCache>),
}

/// What a mixer reads besides its weights and state: the step's input and position, the
/// threads, the quantized-activation cache, RoPE angles and the calibration observer.
pub(crate) struct MixerIo<'a> {
    pub cfg: &'a ModelConfig,
    pub threads: &'a Threads,
    pub act: &'a mut ActCache,
    /// The layer's normalized input: (n_tok, d_model), quantized on demand through `act`.
    pub xn: &'a [f32],
    pub rope: &'a RopeTable,
    pub layer: usize,
    /// Position of the first row (rows follow each other in one sequence) ...
    pub n_past: usize,
    /// ... unless each row has its own: rows of several sequences in one step
    /// ([`crate::Session::forward_batch`]), `(n_tok,)`.
    pub positions: Option<&'a [usize]>,
    pub n_tok: usize,
    pub observer: &'a mut dyn FnMut(LinearInput, &[f32], usize),
    /// Whether `act` holds the quantized `xn` (false: it must be invalidated first).
    pub act_holds_input: bool,
}

impl MixerIo<'_> {
    /// Position of the token in row `t`.
    pub fn position(&self, t: usize) -> usize {
        self.positions.map_or(self.n_past + t, |p| p[t])
    }

    /// Reports `x (n_tok, width)` as the input of `site` to the observer.
    pub fn observe(&mut self, site: LinearInput, x: &[f32], width: usize) {
        (self.observer)(site, &x[..self.n_tok * width], self.n_tok);
    }

    /// `out (n_tok, w.n_out) = xn · wᵀ`: the layer's input, quantized once for all the
    /// projections that read it.
    pub fn linear_of_input(&mut self, w: &Linear<'_>, out: &mut [f32]) {
        if !self.act_holds_input {
            self.act.invalidate();
            self.act_holds_input = true;
        }
        let (act, row) = self.act.get(self.threads, w, self.xn, self.n_tok);
        self.threads.linear(w, act, row, self.n_tok, out);
    }

    /// `out (n_tok, w.n_out) = x · wᵀ` for an input other than the layer's.
    pub fn linear(&mut self, w: &Linear<'_>, x: &[f32], out: &mut [f32]) {
        self.act.invalidate();
        self.act_holds_input = false;
        let (act, row) = self.act.get(self.threads, w, x, self.n_tok);
        self.threads.linear(w, act, row, self.n_tok, out);
    }
}
