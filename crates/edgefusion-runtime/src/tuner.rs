//! Chooses, while the engine runs, how many of its threads the layers use.
//!
//! On a quiet machine every core helps. When other programs keep the CPUs busy, a thread the
//! operating system deschedules in the middle of its share stalls the loop until it runs
//! again, and one thread fewer can be faster (on 2 cores beside one busy process, decode at
//! 2 threads ran at 0.86× of 1 thread). The tuner finds out by trying, on the model's own
//! layers:
//!
//! - **Settled**, every layer runs at the current count. A trial starts once the interval
//!   since the last one has passed and either the pool stalled (its caller waited on a
//!   descheduled partner) long enough that one thread fewer could win (see
//!   [`stall_gate`]), in which case one thread fewer is tried, or, stalling less and with
//!   fewer threads than the pool has, one more. A quiet machine hardly stalls, so at the full
//!   count it never tries anything.
//! - **Trial**: each forward runs `k` layers of its first half at the trial count and the
//!   first `k` of its second half at the current count (timed, to compare), swapping the
//!   halves each forward so neither side gets only early or only late layers. `k` is what
//!   brings each side [`TRIAL_SECS`] over two forwards at the last forward's pace: a few
//!   layers of a long prefill, half of them in decode, so a trial costs a fraction of one
//!   forward's time. Layers of the same kind are compared once both sides have
//!   [`TRIAL_SECS`] over at least two forwards. The trial count is kept when its layers are at
//!   least [`MARGIN`] faster; the next interval then starts at [`MIN_INTERVAL`], else it
//!   doubles up to [`MAX_INTERVAL`].
//!
//! Trials only try neighbours of the current count, and fewer threads only when the pool
//! stalls: a machine where a stalling count is still not the fastest stays put.
//!
//! How many threads take part does not change a result: decode splits output rows, prefill
//! splits tokens and attention splits heads and tokens, so quantized weights give the same
//! logits bit for bit; float weights differ by rounding (their prefill kernels sum a tile of
//! tokens in another order than a lone token).

/// The stalled fraction of the forwards' time at `threads` threads above which a trial of one
/// thread fewer is worth its cost. With work `W` split over `c` threads and stalls `S`, a
/// forward takes `W/c + S`, and `c − 1` threads take at least `W/(c − 1)`: fewer threads can
/// only win when `S` exceeds `1/c` of the forward. Half of that bound triggers a trial (the
/// pool counts only waits longer than its stall threshold, and other losses go unseen).
/// A quiet shared machine stalls 5–7% of the time at 2 threads, one busy process beside
/// decode about 50%.
pub(crate) fn stall_gate(threads: usize) -> f64 {
    0.5 / threads.max(1) as f64
}
/// Layer time each side of a trial needs before it is decided (a time slice of the
/// operating system's scheduler is a few milliseconds: this spans several).
pub(crate) const TRIAL_SECS: f64 = 0.02;
/// A trial decided after this many forwards even when its layers were too short to reach
/// [`TRIAL_SECS`].
const MAX_TRIAL_FORWARDS: usize = 32;
/// How much faster the trial count must be to be kept.
pub(crate) const MARGIN: f64 = 0.05;
/// The shortest and longest wait between trials (seconds).
pub(crate) const MIN_INTERVAL: f64 = 0.25;
pub(crate) const MAX_INTERVAL: f64 = 4.0;
/// Layer kinds told apart when comparing (attention, windowed attention, SSM, SSM with a
/// window): a trial compares like with like.
pub(crate) const N_KINDS: usize = 4;

/// The kind a trial compares a layer with (`< N_KINDS`).
pub(crate) fn mixer_kind(mixer: &edgefusion_model::Mixer<'_>) -> usize {
    use edgefusion_model::Mixer;
    match mixer {
        Mixer::Attention(_) => 0,
        Mixer::Window(_) => 1,
        Mixer::Ssm { window: None, .. } => 2,
        Mixer::Ssm {
            window: Some(_), ..
        } => 3,
    }
}

#[derive(Debug, Clone)]
struct Trial {
    count: usize,
    /// Seconds and layers per kind: `[kind] = (secs, layers)`, at the current count and at
    /// the trial count.
    current: [(f64, usize); N_KINDS],
    trial: [(f64, usize); N_KINDS],
    forwards: usize,
    /// Whether the trial's layers are in the first half of this forward.
    trial_first: bool,
}

impl Trial {
    fn new(count: usize) -> Self {
        Trial {
            count,
            current: [(0.0, 0); N_KINDS],
            trial: [(0.0, 0); N_KINDS],
            forwards: 0,
            trial_first: true,
        }
    }

    /// Seconds each side spent on the kinds both sides ran, each kind weighed by the layers
    /// the two sides ran of it together: `(current, trial)`.
    fn matched_secs(&self) -> (f64, f64) {
        let (mut current, mut trial) = (0.0, 0.0);
        for (&(c_secs, c_n), &(t_secs, t_n)) in self.current.iter().zip(&self.trial) {
            if c_n > 0 && t_n > 0 {
                let weight = (c_n + t_n) as f64;
                current += weight * c_secs / c_n as f64;
                trial += weight * t_secs / t_n as f64;
            }
        }
        (current, trial)
    }

    fn ready(&self) -> bool {
        let side_secs = |side: &[(f64, usize); N_KINDS]| side.iter().map(|s| s.0).sum::<f64>();
        self.forwards >= MAX_TRIAL_FORWARDS
            || (self.forwards >= 2
                && side_secs(&self.current) >= TRIAL_SECS
                && side_secs(&self.trial) >= TRIAL_SECS)
    }
}

/// What the tuner knows between forwards. Times are seconds on one clock, passed in.
#[derive(Debug, Clone)]
pub(crate) struct ThreadTuner {
    max: usize,
    current: usize,
    interval: f64,
    /// When the settled phase began: (time, stalled seconds then).
    /// (time, stalled seconds, forward seconds) when the settled phase began.
    settled_at: (f64, f64, f64),
    /// Seconds spent in forwards so far.
    forward_secs: f64,
    trial: Option<Trial>,
    /// The timed layers of the forward under way, when it is part of a trial: the trial's
    /// and the current count's, each a range of `k` layers.
    timed: Option<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    /// When the forward under way began, and how long the last one took per layer.
    forward_start: f64,
    layer_secs: f64,
}

impl ThreadTuner {
    /// A tuner over `1..=max` threads, starting at `max`, at time `now`.
    pub(crate) fn new(max: usize, now: f64) -> Self {
        ThreadTuner {
            max: max.max(1),
            current: max.max(1),
            interval: MIN_INTERVAL,
            settled_at: (now, 0.0, 0.0),
            forward_secs: 0.0,
            trial: None,
            timed: None,
            forward_start: now,
            layer_secs: 0.0,
        }
    }

    /// A tuner in the middle of a trial of `count` threads (for tests of the engine).
    #[cfg(test)]
    pub(crate) fn trying(max: usize, count: usize) -> Self {
        let mut tuner = ThreadTuner::new(max, 0.0);
        tuner.trial = Some(Trial::new(count));
        tuner
    }

    /// The count settled on (what layers outside a trial use).
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Called before a forward over `n_layers` layers, with the pool's total stalled seconds.
    pub(crate) fn begin_forward(&mut self, n_layers: usize, now: f64, stalled: f64) {
        self.timed = None;
        self.forward_start = now;
        if self.max == 1 || n_layers < 2 {
            return;
        }
        if self.trial.is_none() {
            let (since, stalled_then, forward_then) = self.settled_at;
            if now - since < self.interval {
                return;
            }
            let in_forwards = self.forward_secs - forward_then;
            let stalling = stalled - stalled_then >= stall_gate(self.current) * in_forwards;
            let count = if stalling && self.current > 1 {
                self.current - 1
            } else if !stalling && self.current < self.max {
                self.current + 1
            } else {
                // Stalling at one thread, or quiet at the full count: nothing to try. Look
                // again after another interval.
                self.settled_at = (now, stalled, self.forward_secs);
                return;
            };
            self.trial = Some(Trial::new(count));
        }
        let Some(trial) = &self.trial else {
            return;
        };
        let half = n_layers / 2;
        // Layers per side so that two forwards bring each side TRIAL_SECS (all of a half
        // before the first forward was timed).
        let k = if self.layer_secs > 0.0 {
            ((TRIAL_SECS / 2.0 / self.layer_secs).ceil() as usize).clamp(1, half)
        } else {
            half
        };
        let (first, second) = (0..k, half..half + k);
        self.timed = Some(if trial.trial_first {
            (first, second)
        } else {
            (second, first)
        });
    }

    /// Threads for layer `i` (counted from the first layer of the forward).
    pub(crate) fn layer_threads(&self, i: usize) -> usize {
        match (&self.trial, &self.timed) {
            (Some(trial), Some((on_trial, _))) if on_trial.contains(&i) => trial.count,
            _ => self.current,
        }
    }

    /// Whether layer `i` of this forward is timed.
    pub(crate) fn timing(&self, i: usize) -> bool {
        self.timed
            .as_ref()
            .is_some_and(|(a, b)| a.contains(&i) || b.contains(&i))
    }

    /// Records that layer `i`, of kind `kind` (< [`N_KINDS`]), took `secs`.
    pub(crate) fn end_layer(&mut self, i: usize, kind: usize, secs: f64) {
        if let (Some(trial), Some((on_trial, on_current))) = (&mut self.trial, &self.timed) {
            let side = if on_trial.contains(&i) {
                &mut trial.trial[kind]
            } else if on_current.contains(&i) {
                &mut trial.current[kind]
            } else {
                return;
            };
            side.0 += secs;
            side.1 += 1;
        }
    }

    /// Called after the forward's `n_layers` layers; decides a trial that has seen enough.
    pub(crate) fn end_forward(&mut self, n_layers: usize, now: f64, stalled: f64) {
        let secs = now - self.forward_start;
        self.forward_secs += secs;
        if n_layers > 0 {
            self.layer_secs = secs / n_layers as f64;
        }
        if self.timed.take().is_none() {
            return;
        }
        let Some(trial) = &mut self.trial else {
            return;
        };
        trial.forwards += 1;
        trial.trial_first = !trial.trial_first;
        if !trial.ready() {
            return;
        }
        let (current_secs, trial_secs) = trial.matched_secs();
        if current_secs > 0.0 && trial_secs < (1.0 - MARGIN) * current_secs {
            self.current = trial.count;
            self.interval = MIN_INTERVAL;
        } else {
            self.interval = (2.0 * self.interval).min(MAX_INTERVAL);
        }
        self.trial = None;
        self.settled_at = (now, stalled, self.forward_secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated machine: seconds per layer and stalled seconds per layer-second at each
    /// thread count.
    struct Machine {
        layer_secs: fn(usize) -> f64,
        stall_per_sec: fn(usize) -> f64,
    }

    /// Runs `forwards` forwards of `n_layers` layers; returns the counts used per forward
    /// (settled) and the total time.
    fn run(
        tuner: &mut ThreadTuner,
        machine: &Machine,
        now: &mut f64,
        stalled: &mut f64,
        forwards: usize,
        n_layers: usize,
    ) -> (Vec<usize>, f64) {
        let start = *now;
        let mut settled = Vec::new();
        for _ in 0..forwards {
            tuner.begin_forward(n_layers, *now, *stalled);
            for i in 0..n_layers {
                let threads = tuner.layer_threads(i);
                let secs = (machine.layer_secs)(threads);
                *now += secs;
                *stalled += (machine.stall_per_sec)(threads) * secs;
                if tuner.timing(i) {
                    tuner.end_layer(i, i % 2, secs);
                }
            }
            tuner.end_forward(n_layers, *now, *stalled);
            settled.push(tuner.current());
        }
        (settled, *now - start)
    }

    /// A quiet shared machine: a little imbalance and noise between threads.
    const QUIET: Machine = Machine {
        layer_secs: |t| 1e-4 / t as f64,
        stall_per_sec: |t| if t == 1 { 0.0 } else { 0.07 },
    };
    /// Two threads stall and run slower than one.
    const BUSY: Machine = Machine {
        layer_secs: |t| if t == 1 { 1.5e-4 } else { 1.75e-4 },
        stall_per_sec: |t| if t == 1 { 0.0 } else { 0.3 },
    };

    #[test]
    fn a_quiet_machine_never_tries_fewer_threads() {
        let mut tuner = ThreadTuner::new(2, 0.0);
        let (mut now, mut stalled) = (0.0, 0.0);
        let (settled, secs) = run(&mut tuner, &QUIET, &mut now, &mut stalled, 5000, 30);
        assert!(settled.iter().all(|&c| c == 2));
        // Exactly the time of 2 threads on every layer: no trial ran.
        assert!((secs - 5000.0 * 30.0 * 0.5e-4).abs() < 1e-9, "{secs}");
    }

    #[test]
    fn stalls_that_make_two_threads_slower_lead_to_one_and_back() {
        let mut tuner = ThreadTuner::new(2, 0.0);
        let (mut now, mut stalled) = (0.0, 0.0);
        // ~1 s of decode under load.
        let (settled, _) = run(&mut tuner, &BUSY, &mut now, &mut stalled, 200, 30);
        let first_one = settled.iter().position(|&c| c == 1).expect("never left 2");
        assert!(
            now > 0.0 && first_one < 100,
            "took {first_one} forwards to switch"
        );
        let (settled, _) = run(&mut tuner, &BUSY, &mut now, &mut stalled, 2000, 30);
        let at_one = settled.iter().filter(|&&c| c == 1).count();
        assert!(
            at_one == settled.len(),
            "went back to 2 under load: {at_one}"
        );
        // The load goes: trials of 2 threads find them faster.
        let (settled, _) = run(&mut tuner, &QUIET, &mut now, &mut stalled, 2000, 30);
        assert_eq!(settled.last(), Some(&2));
    }

    /// Stalls alone are no reason to drop a thread: when 2 threads still win, the tuner
    /// keeps them and tries less and less often.
    #[test]
    fn stalls_that_still_leave_two_threads_faster_keep_two() {
        let machine = Machine {
            layer_secs: |t| if t == 1 { 2e-4 } else { 1.4e-4 },
            stall_per_sec: |t| if t == 1 { 0.0 } else { 0.3 },
        };
        let mut tuner = ThreadTuner::new(2, 0.0);
        let (mut now, mut stalled) = (0.0, 0.0);
        let (settled, secs) = run(&mut tuner, &machine, &mut now, &mut stalled, 20_000, 30);
        assert!(settled.iter().all(|&c| c == 2));
        assert_eq!(tuner.interval, MAX_INTERVAL);
        // Trials cost little: within 2% of always 2 threads.
        let always_two = 20_000.0 * 30.0 * 1.4e-4;
        assert!(secs < 1.02 * always_two, "{secs} vs {always_two}");
    }

    #[test]
    fn more_threads_climb_one_step_at_a_time_and_stop_where_stalls_begin() {
        // 4 threads; the fastest is 3 (the 4th shares a core with another program).
        let machine = Machine {
            layer_secs: |t| [0.0, 4e-4, 2.1e-4, 1.5e-4, 2.5e-4][t],
            stall_per_sec: |t| if t == 4 { 0.2 } else { 0.0 },
        };
        let mut tuner = ThreadTuner::new(4, 0.0);
        tuner.current = 1;
        let (mut now, mut stalled) = (0.0, 0.0);
        let (settled, _) = run(&mut tuner, &machine, &mut now, &mut stalled, 3000, 30);
        assert_eq!(
            settled.last(),
            Some(&3),
            "{:?}",
            &settled[settled.len() - 5..]
        );
    }

    /// A trial compares layers of one kind with layers of the same kind.
    #[test]
    fn kinds_are_compared_with_their_own_kind() {
        let mut trial = Trial::new(1);
        // Current: 1 attention layer of 1 ms; trial: 1 attention layer of 0.9 ms and 3 SSM
        // layers of 0.1 ms that the current side never ran.
        trial.current[0] = (1e-3, 1);
        trial.trial[0] = (0.9e-3, 1);
        trial.trial[2] = (0.3e-3, 3);
        let (current, trial_secs) = trial.matched_secs();
        assert!((current - 2e-3).abs() < 1e-12 && (trial_secs - 1.8e-3).abs() < 1e-12);
    }

    #[test]
    fn one_thread_or_one_layer_never_tries() {
        let mut tuner = ThreadTuner::new(1, 0.0);
        tuner.begin_forward(30, 10.0, 5.0);
        assert!(!tuner.timing(0) && tuner.layer_threads(0) == 1);
        let mut tuner = ThreadTuner::new(2, 0.0);
        tuner.begin_forward(1, 10.0, 5.0);
        assert!(!tuner.timing(0) && tuner.layer_threads(0) == 2);
    }
}
