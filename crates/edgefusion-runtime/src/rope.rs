//! RoPE angles of every position of a session, computed once.

use edgefusion_model::{ModelConfig, RopeScaling, RopeStyle};

/// RoPE rotation angles per position: `(n_ctx, rope_dim / 2)` cosines and sines.
pub(crate) struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// The angles of the model's (global) layers.
    pub(crate) fn new(cfg: &ModelConfig, n_ctx: usize) -> Self {
        Self::with_base(cfg, cfg.rope_base, &cfg.rope_scaling, n_ctx)
    }

    /// The angles of `window` layers where they rotate with their own base, unscaled
    /// (Gemma 3's local layers); `None` where they rotate like the others.
    pub(crate) fn for_window_layers(cfg: &ModelConfig, n_ctx: usize) -> Option<Self> {
        let base = cfg.local_rope_base()?;
        Some(Self::with_base(cfg, base, &RopeScaling::None, n_ctx))
    }

    /// Angles as llama.cpp computes them (`ggml_rope_cache_init`), in f32 with the
    /// frequency advanced by repeated multiplication, so positions rotate identically.
    fn with_base(cfg: &ModelConfig, base: f32, scaling: &RopeScaling, n_ctx: usize) -> Self {
        let half = cfg.rope_dim / 2;
        let theta_scale = base.powf(-2.0 / cfg.rope_dim as f32);
        // Per-frequency divisor of the angle (1 = unscaled).
        let freq_divisor: Vec<f32> = (0..half)
            .map(|i| scaling.divisor(i, theta_scale.powi(i as i32)))
            .collect();
        let mut cos = vec![0.0f32; n_ctx * half];
        let mut sin = vec![0.0f32; n_ctx * half];
        for pos in 0..n_ctx {
            let mut theta = pos as f32;
            for i in 0..half {
                let angle = theta / freq_divisor[i];
                cos[pos * half + i] = angle.cos();
                sin[pos * half + i] = angle.sin();
                theta *= theta_scale;
            }
        }
        RopeTable { cos, sin, half }
    }

    /// Rotates one head `(head_dim)` in place for position `pos`.
    ///
    /// Each rotated value is one fused multiply-add over the other product, as llama.cpp's
    /// `rotate_pairs` compiles (GCC contracts `x0·cos − x1·sin` to `fma(x0, cos, −(x1·sin))`):
    /// a plain multiply-subtract differs in the last bit for about one value in seven.
    #[inline]
    pub(crate) fn apply(&self, head: &mut [f32], pos: usize, style: RopeStyle) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        #[cfg(target_arch = "x86_64")]
        if edgefusion_kernels::cpu::isa().has_avx2() {
            // SAFETY: the AVX2 ISA level is detected with FMA (`cpu::isa`).
            unsafe { rotate_fma(head, cos, sin, style) };
            return;
        }
        rotate(head, cos, sin, style);
    }
}

/// [`rotate`] compiled with FMA, where `mul_add` is one instruction instead of a libm call.
///
/// # Safety
/// The CPU must support FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rotate_fma(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    rotate(head, cos, sin, style)
}

/// The rotation of [`RopeTable::apply`] with the angles of one position.
#[inline(always)]
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    let pair = |a: f32, b: f32, c: f32, s: f32| (a.mul_add(c, -(b * s)), a.mul_add(s, b * c));
    match style {
        RopeStyle::Normal => {
            for i in 0..half {
                (head[2 * i], head[2 * i + 1]) = pair(head[2 * i], head[2 * i + 1], cos[i], sin[i]);
            }
        }
        RopeStyle::NeoX => {
            for i in 0..half {
                (head[i], head[i + half]) = pair(head[i], head[i + half], cos[i], sin[i]);
            }
        }
    }
}
