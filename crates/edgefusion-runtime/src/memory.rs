//! What a session's memory comes to, planned from a model's shapes before the model
//! exists: the weights, one sequence's state at a context length, the scratch buffers, and
//! the process itself. `quantize --fit` chooses a budget with it, `train --dry-run` plans
//! with it, and `run --profile` sets the measured peak beside it.

use edgefusion_kernels::efq::ActQ8;
use edgefusion_kernels::GgmlType;
use edgefusion_model::{LayerType, ModelConfig};

use crate::engine::SessionOptions;
use crate::mixer::attention::{score_columns, AttnPlan, KvType};

/// Resident bytes of the process besides the model and the session: code, the tokenizer's
/// tables, the allocator's arenas and thread stacks. Measured with `edgefusion run
/// --profile` on SmolLM2 (49K-token vocabulary) as peak RSS minus everything else.
pub const PROCESS_BYTES: usize = 20 << 20;

/// A session's memory, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The model file's tensors and metadata (memory-mapped, all of it read).
    pub weights: usize,
    /// One sequence's state at the context length: attention K and V, window K and V,
    /// SSM states.
    pub state: usize,
    /// Activations, logits, quantized activations, attention and SSM scratch, RoPE tables,
    /// the staging slots of windowed caches.
    pub buffers: usize,
    /// [`PROCESS_BYTES`].
    pub process: usize,
}

impl MemoryPlan {
    pub fn total(&self) -> usize {
        self.weights + self.state + self.buffers + self.process
    }

    /// One line: the total and its parts in MiB.
    pub fn describe(&self) -> String {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        format!(
            "{:.1} MiB = weights {:.1} + state {:.1} + buffers {:.1} + process {:.1}",
            mib(self.total()),
            mib(self.weights),
            mib(self.state),
            mib(self.buffers),
            mib(self.process)
        )
    }
}

/// Bytes of one sequence's state at `opts.n_ctx` positions with `opts.kv_type`.
pub fn state_bytes(cfg: &ModelConfig, opts: &SessionOptions) -> usize {
    let f16 = cfg.context_state_bytes(opts.n_ctx);
    match opts.kv_type {
        KvType::F16 => f16,
        // K and V double; SSM states (already f32) stay.
        KvType::F32 => {
            let ssm = cfg.count_layers(LayerType::Ssm) * cfg.ssm_state_floats() * 4;
            2 * (f16 - ssm) + ssm
        }
    }
}

/// Bytes of the scratch a [`crate::Session`] with `opts` allocates for `cfg`, counted as
/// if every byte were touched (a long prefill touches them all).
pub fn buffer_bytes(cfg: &ModelConfig, opts: &SessionOptions) -> usize {
    let n_ctx = opts.n_ctx.max(1);
    let max_batch = opts.max_batch.clamp(1, n_ctx);
    let max_logits = opts.max_logits.clamp(1, n_ctx);
    let combined = cfg.n_window_layers() > 0 && cfg.count_layers(LayerType::Ssm) > 0;
    let residual = max_batch * cfg.d_model * if combined { 4 } else { 3 };
    let ffn = 2 * max_batch * cfg.d_ff;
    let logits = max_logits * cfg.vocab_size;
    // One buffer per activation format (engine::ActCache), each for the widest input.
    let widest = cfg
        .d_model
        .max(cfg.q_dim())
        .max(cfg.d_ff)
        .max(cfg.ssm_channels());
    let act_row: usize = [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8K]
        .iter()
        .map(|t| t.row_bytes(widest).unwrap_or(4 * widest))
        .sum::<usize>()
        + 4 * widest
        + 2 * ActQ8::row_bytes(widest);
    // As `AttnScratch::new`: the most any thread count a layer may run on needs, over the
    // full cache and the window's.
    let slots = score_columns(cfg, n_ctx, max_batch);
    let most = |f: &dyn Fn(usize, usize) -> usize| {
        (1..=opts.n_threads.max(1))
            .flat_map(|t| slots.iter().map(move |&n| (t, n)))
            .map(|(t, n)| f(t, n))
            .max()
            .unwrap_or(0)
    };
    let attention = 2 * max_batch * (cfg.q_dim() + cfg.kv_dim())
        + most(&|t, n| AttnPlan::max_out_len(cfg, max_batch, t, n))
        + most(&|t, n| AttnPlan::max_scratch_len(cfg, max_batch, t, n));
    let ssm = if cfg.count_layers(LayerType::Ssm) > 0 {
        max_batch
            * ((cfg.n_heads + cfg.n_kv_heads) * cfg.ssm_d_state
                + cfg.kv_dim()
                + 2 * cfg.n_kv_heads
                + cfg.q_dim())
    } else {
        0
    };
    // RoPE angles: one table, and a second where local layers rotate with their own base.
    let rope = n_ctx
        * cfg.rope_dim
        * if cfg.local_rope_base().is_some() {
            2
        } else {
            1
        };
    // Each windowed layer's cache stages a step's keys and values beside its sink and window.
    let kv_element = match opts.kv_type {
        KvType::F16 => 2,
        KvType::F32 => 4,
    };
    let staging = cfg.n_window_layers() * 2 * cfg.kv_dim() * max_batch * kv_element;
    4 * (residual + ffn + logits + attention + ssm + rope) + max_batch * act_row + staging
}

/// The whole plan for a model of `cfg` whose file takes `weight_bytes`.
pub fn plan(cfg: &ModelConfig, weight_bytes: usize, opts: &SessionOptions) -> MemoryPlan {
    MemoryPlan {
        weights: weight_bytes,
        state: state_bytes(cfg, opts),
        buffers: buffer_bytes(cfg, opts),
        process: PROCESS_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_io::ModelSource;
    use edgefusion_model::Model;
    use edgefusion_testkit::fixture;

    /// The planned state is what a session allocates (to the 16-slot panels of the key
    /// cache), for dense, hybrid, windowed and Gemma 3 models and both KV types; the buffers
    /// grow with the batch and the context.
    #[test]
    fn planned_state_is_what_a_session_allocates() {
        for name in [
            "tiny-llama-f32",
            "tiny-hybrid-f32",
            "tiny-window-f32",
            "tiny-gemma3-f32",
        ] {
            let source = ModelSource::open(fixture(&format!("{name}.gguf"))).unwrap();
            let model = Model::load(&source).unwrap();
            let cfg = &model.config;
            for (n_ctx, kv_type) in [(64, KvType::F16), (256, KvType::F32)] {
                let mut opts = SessionOptions::new(n_ctx, 1);
                opts.kv_type = kv_type;
                let session = crate::Session::new(&model, opts.clone()).unwrap();
                let allocated = session.kv_bytes() + session.recurrent_state_bytes();
                let planned = state_bytes(cfg, &opts);
                assert!(
                    planned <= allocated && allocated <= planned + planned / 8 + 4096,
                    "{name} ctx {n_ctx} {kv_type:?}: planned {planned}, allocated {allocated}"
                );
            }
            let small = buffer_bytes(cfg, &SessionOptions::new(64, 1));
            assert!(buffer_bytes(cfg, &SessionOptions::new(1024, 1)) > small);
            let mut one = SessionOptions::new(64, 1);
            one.max_batch = 1;
            assert!(buffer_bytes(cfg, &one) < small);
        }
    }
}
