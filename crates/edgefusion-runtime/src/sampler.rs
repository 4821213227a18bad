//! Turning logits into the next token: greedy, or temperature with top-k / top-p / min-p
//! filtering and a repetition penalty, in llama.cpp's order (penalties, top-k, top-p, min-p,
//! temperature).

/// Sampling settings. `temperature <= 0` means greedy.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

/// Small, fast, seedable generator (SplitMix64); sampling needs no cryptographic quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks tokens; holds its candidate buffer so sampling allocates nothing per token.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    /// (token, logit or probability), reused between calls.
    candidates: Vec<(u32, f32)>,
    /// Distinct recent tokens for the repetition penalty, reused between calls.
    recent: Vec<u32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig, vocab_size: usize) -> Self {
        Sampler {
            rng: Rng::new(cfg.seed),
            cfg,
            candidates: Vec::with_capacity(vocab_size),
            recent: Vec::with_capacity(256),
        }
    }

    /// The next token given the logits of the last position and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let cfg = &self.cfg;
        let penalised = cfg.repeat_penalty != 1.0 && !history.is_empty();
        if cfg.temperature <= 0.0 && !penalised {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if penalised {
            // Each distinct recent token is penalised once, as llama.cpp does.
            self.recent.clear();
            self.recent
                .extend_from_slice(&history[history.len().saturating_sub(cfg.repeat_last_n)..]);
            self.recent.sort_unstable();
            self.recent.dedup();
            for &tok in &self.recent {
                if let Some(c) = self.candidates.get_mut(tok as usize) {
                    c.1 = if c.1 > 0.0 {
                        c.1 / cfg.repeat_penalty
                    } else {
                        c.1 * cfg.repeat_penalty
                    };
                }
            }
        }
        if cfg.temperature <= 0.0 {
            return self
                .candidates
                .iter()
                .fold((0u32, f32::NEG_INFINITY), |best, &c| {
                    if c.1 > best.1 {
                        c
                    } else {
                        best
                    }
                })
                .0;
        }
        let cands = &mut self.candidates;
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if cfg.top_k > 0 && cfg.top_k < cands.len() {
            cands.select_nth_unstable_by(cfg.top_k - 1, by_logit_desc);
            cands.truncate(cfg.top_k);
        }
        cands.sort_unstable_by(by_logit_desc);
        // Softmax at temperature 1 for the filters (llama.cpp applies temperature last).
        softmax_in_place(cands, 1.0);
        if cfg.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cumulative += c.1;
                if cumulative >= cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if cfg.min_p > 0.0 {
            let threshold = cands[0].1 * cfg.min_p;
            let keep = cands.iter().take_while(|c| c.1 >= threshold).count();
            cands.truncate(keep.max(1));
        }
        // Back to logits (log of the filtered probabilities), then temperature.
        for c in cands.iter_mut() {
            c.1 = c.1.max(f32::MIN_POSITIVE).ln();
        }
        softmax_in_place(cands, cfg.temperature);
        let r = self.rng.next_f32();
        let mut cumulative = 0.0;
        for c in cands.iter() {
            cumulative += c.1;
            if r < cumulative {
                return c.0;
            }
        }
        cands.last().map_or(0, |c| c.0)
    }
}

fn softmax_in_place(cands: &mut [(u32, f32)], temperature: f32) {
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for c in cands.iter_mut() {
        c.1 = ((c.1 - max) / temperature).exp();
        sum += c.1;
    }
    for c in cands.iter_mut() {
        c.1 /= sum;
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 0.0,
                ..Default::default()
            },
            4,
        );
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 0.0,
                repeat_penalty: 2.0,
                ..Default::default()
            },
            3,
        );
        // 3.0 / 2 = 1.5 < 2.0, so token 2 wins once token 1 was seen (twice: penalised once).
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1, 1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                top_k: 1,
                ..Default::default()
            },
            100,
        );
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let cfg = SamplerConfig {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone(), 100);
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&cfg), draw(&cfg));
        assert!(draw(&cfg).iter().any(|&t| t != argmax(&logits)));
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        // Token 0 has almost all the mass; min_p 0.5 leaves only it.
        let logits = [10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.5,
                seed: 1,
                ..Default::default()
            },
            4,
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[]), 0);
        }
    }
}
