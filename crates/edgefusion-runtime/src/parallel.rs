//! How the engine spreads a linear layer over threads.
//!
//! Decode (one token) splits the output rows, so each thread streams its own slice of the
//! weights once. Prefill (many tokens) splits the tokens: each thread reads the whole matrix,
//! row panel by row panel sized to stay in L2, and reuses every panel across its tokens.

use std::time::Instant;

use edgefusion_kernels::threads::ThreadPool;
use edgefusion_kernels::BatchPart;
use edgefusion_model::{Layout, Linear, Mixer};

use crate::tuner::{mixer_kind, ThreadTuner};

/// Bytes of weights per row panel in prefill: about a quarter of a typical 1–2 MiB L2.
const PANEL_BYTES: usize = 256 * 1024;
/// Row ranges are multiples of this (whole row groups for the SIMD kernels, and whole
/// 16-row groups of interleaved matrices).
const ROW_ALIGN: usize = 16;
/// The engine's worker threads (the caller included), and, when they adapt to the load,
/// the tuner that picks how many of them each layer uses (see [`crate::tuner`]).
pub struct Threads {
    pool: ThreadPool,
    tuner: Option<ThreadTuner>,
    /// The tuner's clock.
    epoch: Instant,
}

impl Threads {
    /// `n_threads` ≥ 1 workers (the caller validates the count); with `adapt`, layers may use
    /// fewer while that is faster.
    pub fn new(n_threads: usize, adapt: bool) -> std::io::Result<Self> {
        let pool = ThreadPool::new(n_threads)?;
        let tuner =
            (adapt && pool.n_threads() > 1).then(|| ThreadTuner::new(pool.n_threads(), 0.0));
        Ok(Threads {
            pool,
            tuner,
            epoch: Instant::now(),
        })
    }

    /// Threads whose tuner is in the middle of a trial of `count` threads.
    #[cfg(test)]
    pub(crate) fn trying(n_threads: usize, count: usize) -> Self {
        Threads {
            pool: ThreadPool::new(n_threads).unwrap(),
            tuner: Some(ThreadTuner::trying(n_threads, count)),
            epoch: Instant::now(),
        }
    }

    /// Threads the parallel loops run on now (work is split in as many parts).
    pub fn n_threads(&self) -> usize {
        self.pool.active_threads()
    }

    /// Threads of the pool: the most any loop runs on.
    pub fn max_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Threads the tuner has settled on (the pool's size when threads do not adapt).
    pub fn settled_threads(&self) -> usize {
        self.tuner
            .as_ref()
            .map_or(self.pool.n_threads(), ThreadTuner::current)
    }

    /// Before a forward over `n_layers` layers.
    pub(crate) fn begin_layers(&mut self, n_layers: usize) {
        if let Some(tuner) = &mut self.tuner {
            let (now, stalled) = (self.epoch.elapsed(), self.pool.stalled());
            tuner.begin_forward(n_layers, now.as_secs_f64(), stalled.as_secs_f64());
        }
    }

    /// Before layer `i` of the forward: sets its thread count; returns its start time when
    /// the tuner times it.
    pub(crate) fn begin_layer(&self, i: usize) -> Option<Instant> {
        let tuner = self.tuner.as_ref()?;
        self.pool.set_active_threads(tuner.layer_threads(i));
        tuner.timing(i).then(Instant::now)
    }

    /// After layer `i`, whose mixer is `mixer`, which started at `start` (when timed).
    pub(crate) fn end_layer(&mut self, i: usize, mixer: &Mixer<'_>, start: Option<Instant>) {
        if let (Some(tuner), Some(start)) = (&mut self.tuner, start) {
            tuner.end_layer(i, mixer_kind(mixer), start.elapsed().as_secs_f64());
        }
    }

    /// After the forward's `n_layers` layers: the tuner may decide, and what follows (the
    /// output head) runs at the settled count.
    pub(crate) fn end_layers(&mut self, n_layers: usize) {
        if let Some(tuner) = &mut self.tuner {
            let (now, stalled) = (self.epoch.elapsed(), self.pool.stalled());
            tuner.end_forward(n_layers, now.as_secs_f64(), stalled.as_secs_f64());
            self.pool.set_active_threads(tuner.current());
        }
    }

    /// Calls `f(index, chunk)` for consecutive `chunk_len`-sized chunks of `out`, spread over
    /// the threads.
    pub fn for_chunks<T: Send>(
        &self,
        out: &mut [T],
        chunk_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        self.pool.for_chunks_mut(out, chunk_len, f);
    }

    /// Like [`Threads::for_chunks`], with the `i`-th chunk also getting the `i`-th
    /// `scratch_len`-long slice of `scratch` (which must hold one per chunk).
    pub fn for_chunks_with_scratch(
        &self,
        out: &mut [f32],
        chunk_len: usize,
        scratch: &mut [f32],
        scratch_len: usize,
        f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
    ) {
        debug_assert!(out.len().div_ceil(chunk_len.max(1)) * scratch_len <= scratch.len());
        self.pool
            .for_chunks_mut2(out, chunk_len, scratch, scratch_len, f);
    }

    /// `out (n_tok, w.n_out) = act (n_tok, w.n_in) · wᵀ`, where `act` holds `n_tok` rows already
    /// quantized to `w.act_format()`, each `act_row_bytes` long.
    pub fn linear(
        &self,
        w: &Linear<'_>,
        act: &[u8],
        act_row_bytes: usize,
        n_tok: usize,
        out: &mut [f32],
    ) {
        let n_out = w.n_out;
        let out = &mut out[..n_tok * n_out];
        if n_tok == 1 {
            // One task per thread: the pool's threads take tasks as they come, so a task a
            // descheduled thread has not started is done by another. Smaller tasks would
            // also cover a thread descheduled mid-task, but 4 per thread cost 16% of decode
            // on a quiet 2-core machine (`scripts/bench-contention.sh`).
            let per_thread = n_out.div_ceil(self.n_threads());
            let chunk = per_thread.div_ceil(ROW_ALIGN) * ROW_ALIGN;
            self.for_chunks(out, chunk, |i, rows_out| {
                let r0 = i * chunk;
                let r1 = r0 + rows_out.len();
                let stride = rows_out.len();
                w.matmul_rows(r0, r1, act, 1, rows_out, stride, BatchPart::whole(1));
            });
            return;
        }
        // One task per thread here too: each reads the whole matrix, and 2 per thread cost
        // 9% of pp512.
        let tok_chunk = n_tok.div_ceil(self.n_threads());
        let panel_rows = match w.layout() {
            Layout::Rows => (PANEL_BYTES / w.row_bytes().max(1) / ROW_ALIGN * ROW_ALIGN)
                .clamp(ROW_ALIGN, n_out.max(ROW_ALIGN)),
            // These kernels already reuse each 16-row group from L1 across every token; one
            // call per token chunk prepares the activations once instead of once per panel.
            Layout::Interleaved | Layout::Efq => n_out,
        };
        self.for_chunks(out, tok_chunk * n_out, |i, tok_out| {
            let t0 = i * tok_chunk;
            let nt = tok_out.len() / n_out;
            let act_rows = &act[t0 * act_row_bytes..(t0 + nt) * act_row_bytes];
            let mut r0 = 0;
            while r0 < n_out {
                let r1 = (r0 + panel_rows).min(n_out);
                let part = BatchPart {
                    first: t0,
                    batch: n_tok,
                };
                w.matmul_rows(r0, r1, act_rows, nt, &mut tok_out[r0..], n_out, part);
                r0 = r1;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_io::TensorView;
    use edgefusion_kernels::GgmlType;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sampler::Rng::new(seed);
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    /// `Threads::linear` (row panels, token or row split) equals one `vec_dot` per output,
    /// for shapes whose panels do not divide the rows and token counts that leave remainders.
    #[test]
    fn linear_equals_vec_dot_per_output() {
        for (ty, n_in, n_out) in [
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q4_0, 1536, 1000),
            (GgmlType::Q8_0, 576, 777),
            (GgmlType::Q8_0, 576, 1024),
            (GgmlType::Q5_0, 576, 192),
            (GgmlType::Q4K, 512, 300),
            (GgmlType::F16, 64, 2000),
        ] {
            let row_bytes = ty.row_bytes(n_in).unwrap();
            let floats = values(n_in * n_out, 1);
            let mut data = vec![0u8; row_bytes * n_out];
            for (src, dst) in floats.chunks(n_in).zip(data.chunks_mut(row_bytes)) {
                edgefusion_kernels::quantize_row_ref(ty, src, dst);
            }
            let shape = [n_in, n_out];
            let view = TensorView {
                name: "w",
                dtype: ty,
                shape: &shape,
                data: &data,
            };
            let rows = Linear::from_view(view, "test", n_in, n_out).unwrap();
            // The same matrix in the layout this CPU's kernels prefer (when it has one).
            let mut interleaved = Linear::from_view(view, "test", n_in, n_out).unwrap();
            interleaved.interleave_for_cpu();
            for w in [&rows, &interleaved] {
                let act_format = w.act_format();
                let act_row = act_format.row_bytes(n_in);
                for n_tok in [1, 2, 3, 4, 5, 7, 9] {
                    let x = values(n_in * n_tok, 2 + n_tok as u64);
                    let mut act = vec![0u8; act_row * n_tok];
                    for (src, dst) in x.chunks(n_in).zip(act.chunks_mut(act_row)) {
                        act_format.quantize_row(src, dst);
                    }
                    for n_threads in [1, 2] {
                        let threads = Threads::new(n_threads, false).unwrap();
                        let mut out = vec![f32::NAN; n_tok * n_out];
                        threads.linear(w, &act, act_row, n_tok, &mut out);
                        for t in 0..n_tok {
                            for r in 0..n_out {
                                let expected = edgefusion_kernels::vec_dot(
                                    ty,
                                    n_in,
                                    rows.rows(r, r + 1),
                                    &act[t * act_row..(t + 1) * act_row],
                                );
                                let got = out[t * n_out + r];
                                assert!(
                                (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                                "{} {:?} n_tok {n_tok} threads {n_threads}: out[{t}][{r}] = {got}, vec_dot {expected}",
                                ty.name(),
                                w.layout()
                            );
                            }
                        }
                    }
                }
            }
        }
    }
}
