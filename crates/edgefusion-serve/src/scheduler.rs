//! The compute side: one OS thread owns the model and the slots, and runs every forward pass.
//!
//! Each round the scheduler admits queued jobs into free slots (the free slot whose cached
//! tokens share the longest prefix with the prompt keeps them: prefix reuse), samples one
//! token for every slot whose prompt is in, and feeds those tokens and up to `prefill_chunk`
//! prompt tokens of the slots still prefilling through the model in one batched step
//! ([`Session::forward_batch`]): requests join and leave the batch at token boundaries, and a
//! long prompt is prefilled over several rounds while the other streams go on.
//! Tokens go back to the HTTP side over each job's unbounded channel, so the scheduler never
//! waits for a client; a client that went away closes its channel and its slot is freed at
//! the next round.

use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::chat::{ChatTemplate, CHATML_TEMPLATE};
use edgefusion_runtime::constrained::{Grammar, JsonMatcher, TokenMask};
use edgefusion_runtime::sampler::argmax;
use edgefusion_runtime::tokenizer::{TokenStreamer, Tokenizer};
use edgefusion_runtime::{Sampler, SamplerConfig, Sequence, Session, SessionOptions};
use tokio::sync::mpsc::UnboundedSender;

use crate::state_cache::StateCache;
use crate::{ServeConfig, ServeError};

/// How one generation is to be run.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampler: SamplerConfig,
    /// Tokens to generate at most (the context may end it sooner).
    pub max_tokens: usize,
    /// Generation ends before the first of these strings; it is not returned.
    pub stop: Vec<String>,
    /// OpenAI's penalties: logit −= presence·[count > 0] + frequency·count, over the
    /// generated tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Report each generated token's log-probability and this many most likely
    /// alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// The grammar the output must follow (`response_format`), enforced token by token.
    pub json: Option<Arc<Grammar>>,
}

/// A request for the scheduler: the prompt's tokens and where to send the results.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Prompt positions that end a chat message (the system prompt, earlier turns): a
    /// hybrid model's slot saves its states there, so that a later prompt sharing that much
    /// starts from them ([`ModelInfo::saves_states`]; a dense model's cache is cut anywhere).
    pub boundaries: Vec<usize>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    /// When the request must be answered by (`--timeout`): a job still queued then is
    /// refused ([`Event::TimedOut`]), a generation still running ends there with `length`.
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the scheduler sends back for a job: text pieces, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    /// A generated token's log-probability (when asked for), sent before its text.
    Logprob(TokenLogprob),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The job waited in the queue past its deadline and never ran.
    TimedOut(String),
}

/// One generated token's log-probability under the model (after the penalties and a
/// `response_format`'s mask, before temperature), and the most likely tokens at that step.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

/// A token as the API shows it: its text (bytes that are not whole UTF-8 characters are
/// shown lossily) and its bytes.
#[derive(Debug, Clone)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenText {
    fn of(tokenizer: &Tokenizer, id: u32) -> Self {
        let bytes = tokenizer
            .decode(&[id])
            .map(String::into_bytes)
            .unwrap_or_else(|_| tokenizer.token_bytes(id).unwrap_or_default().to_vec());
        TokenText {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }
}

/// `token`'s log-probability under `logits` and the `top` most likely tokens, most likely
/// first.
fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob = |id: u32| (logits[id as usize] as f64 - log_z) as f32;
    let mut best: Vec<u32> = Vec::with_capacity(top + 1);
    if top > 0 {
        // Tokens a grammar masked (−∞) are not alternatives.
        let mut ids: Vec<u32> = (0..logits.len() as u32)
            .filter(|&id| logits[id as usize].is_finite())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if top < ids.len() {
            ids.select_nth_unstable_by(top - 1, by_logit);
            ids.truncate(top);
        }
        ids.sort_unstable_by(by_logit);
        best = ids;
    }
    TokenLogprob {
        token: TokenText::of(tokenizer, token),
        logprob: logprob(token),
        top: best
            .into_iter()
            .map(|id| (TokenText::of(tokenizer, id), logprob(id)))
            .collect(),
    }
}

/// Counters for `/metrics`, shared by both sides.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub cancelled: AtomicU64,
    /// Jobs that reached their deadline (`--timeout`), queued or generating.
    pub timed_out: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens a slot already held (prefix reuse), not prefilled again.
    pub prompt_tokens_cached: AtomicU64,
    pub tokens_generated: AtomicU64,
    /// Tokens generated per second over the last [`RATE_WINDOW`] (0 while idle), as f64
    /// bits.
    pub tokens_per_second: AtomicU64,
    /// Batched decode steps, and the sequences they advanced (their ratio is the mean batch).
    pub decode_steps: AtomicU64,
    pub decode_rows: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active_slots: AtomicUsize,
    /// Recurrent states saved for prefix reuse (hybrid models), and their bytes.
    pub saved_states: AtomicUsize,
    pub saved_state_bytes: AtomicUsize,
    pub saved_states_evicted: AtomicU64,
    /// Jobs accepted and not finished (queued or in a slot): admission keeps it at most
    /// `slots + queue`, so a request that finds a free slot is never refused.
    pub in_flight: AtomicUsize,
}

impl Metrics {
    /// A job left the scheduler (finished, failed or cancelled).
    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the HTTP side knows of the model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// Context of each slot.
    pub n_ctx: usize,
    pub n_ctx_train: usize,
    pub vocab_size: usize,
    pub slots: usize,
    /// Whether the slots save their constant-size states for prefix reuse (a hybrid or
    /// sliding-window model with a state budget): at [`Job::boundaries`] and one token
    /// before the end of each prompt.
    pub saves_states: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds its maximum: try again later (429).
    QueueFull,
    /// The scheduler is shutting down or has failed.
    Closed,
}

/// The running scheduler thread and what the handlers share with it.
pub struct Engine {
    jobs: Mutex<Option<SyncSender<Job>>>,
    /// `slots + queue`: jobs that may be in flight at once.
    capacity: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: ChatTemplate,
    pub info: ModelInfo,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// `--timeout`: how long a request may take from its arrival.
    pub request_timeout: Option<Duration>,
}

impl Engine {
    /// Starts the scheduler thread, which loads the model, its session and the slots' sequences; returns
    /// once they are ready, or with the error that stopped them.
    pub fn start(cfg: ServeConfig) -> Result<Engine, ServeError> {
        if cfg.slots == 0 {
            return Err(ServeError::Config("--slots must be at least 1".into()));
        }
        if cfg.queue == 0 {
            return Err(ServeError::Config("--queue must be at least 1".into()));
        }
        if cfg.threads == 0 {
            return Err(ServeError::Config("--threads must be at least 1".into()));
        }
        let capacity = cfg.slots + cfg.queue;
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(capacity);
        let (ready_tx, ready_rx) =
            mpsc::channel::<Result<(Arc<Tokenizer>, ModelInfo), ServeError>>();
        let metrics = Arc::new(Metrics::default());
        let thread_metrics = metrics.clone();
        let thread_cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("edgefusion-scheduler".into())
            .spawn(move || scheduler_main(thread_cfg, job_rx, ready_tx, thread_metrics))
            .map_err(|source| ServeError::Net {
                what: "starting the scheduler thread".into(),
                source,
            })?;
        let (tokenizer, info) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ServeError::Config(
                    "the scheduler thread stopped while loading the model".into(),
                ));
            }
        };
        let chat_template = match tokenizer.chat_template() {
            Some(source) => ChatTemplate::new(source)?,
            None => ChatTemplate::new(CHATML_TEMPLATE)?,
        };
        Ok(Engine {
            jobs: Mutex::new(Some(job_tx)),
            capacity,
            thread: Mutex::new(Some(thread)),
            tokenizer,
            chat_template,
            info,
            metrics,
            api_key: cfg.api_key,
            request_timeout: cfg.request_timeout,
        })
    }

    /// Queues a job without waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let guard = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::Closed);
        };
        // Counted before the send so the scheduler's decrements never precede them.
        if self.metrics.in_flight.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.metrics.release();
            return Err(SubmitError::QueueFull);
        }
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                self.metrics.release();
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Stops taking jobs, lets the scheduler finish the admitted and queued ones, and joins
    /// it.
    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The tokenizer shipped with the model: GGUF metadata, or tokenizer.json in the folder.
pub fn load_tokenizer(source: &ModelSource) -> Result<Tokenizer, ServeError> {
    match source {
        ModelSource::Gguf(gguf) => Ok(Tokenizer::from_gguf(gguf)?),
        ModelSource::HfDir(dir) => match dir.tokenizer_json.as_deref() {
            Some(path) => Ok(Tokenizer::from_tokenizer_json(path)?),
            None => Err(ServeError::Config(format!(
                "{}: no tokenizer.json in the model folder",
                dir.dir.display()
            ))),
        },
    }
}

fn default_name(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

type Ready = mpsc::Sender<Result<(Arc<Tokenizer>, ModelInfo), ServeError>>;

fn scheduler_main(cfg: ServeConfig, jobs: Receiver<Job>, ready: Ready, metrics: Arc<Metrics>) {
    let loaded = (|| {
        let source = ModelSource::open(&cfg.model_path)?;
        let tokenizer = load_tokenizer(&source)?;
        Ok::<_, ServeError>((source, tokenizer))
    })();
    let (source, tokenizer) = match loaded {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let model = match Model::load(&source) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let cfgm = &model.config;
    let n_ctx = cfg.ctx.unwrap_or(cfgm.n_ctx_train.min(4096));
    if n_ctx < 2 {
        let _ = ready.send(Err(ServeError::Config("--ctx must be at least 2".into())));
        return;
    }
    // One session runs every slot's sequence: its scratch and threads serve them all, and
    // each decode round is one batched step over the active ones.
    let mut opts = SessionOptions::new(n_ctx, cfg.threads);
    opts.max_logits = cfg.slots;
    opts.max_batch = opts.max_batch.max(cfg.slots + cfg.prefill_chunk);
    let mut session = match Session::new(&model, opts) {
        Ok(session) => session,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    if session.options().max_logits < cfg.slots {
        let _ = ready.send(Err(ServeError::Config(format!(
            "--slots {} exceeds the context of {n_ctx} tokens: a batched step takes at most one sequence per context position",
            cfg.slots
        ))));
        return;
    }
    let mut slots: Vec<Slot> = (0..cfg.slots)
        .map(|_| Slot {
            seq: session.new_sequence(),
            cached: Vec::new(),
            active: None,
        })
        .collect();
    // The saved states' budget, in states of this model (none for a dense model).
    let state_bytes = session.recurrent_state_bytes();
    let state_capacity = if session.has_recurrent_state() && state_bytes > 0 {
        cfg.state_cache_bytes / state_bytes
    } else {
        0
    };
    if session.has_recurrent_state() && cfg.state_cache_bytes > 0 && state_capacity == 0 {
        eprintln!(
            "edgefusion serve: a saved state of this model takes {:.1} MiB, more than the state cache's budget: prefix reuse keeps only whole cached sequences (raise --state-cache-mib)",
            state_bytes as f64 / (1 << 20) as f64
        );
    }
    let info = ModelInfo {
        name: cfg
            .model_name
            .clone()
            .unwrap_or_else(|| default_name(&cfg.model_path)),
        n_ctx,
        n_ctx_train: cfgm.n_ctx_train,
        vocab_size: cfgm.vocab_size,
        slots: cfg.slots,
        saves_states: state_capacity > 0,
    };
    let tokenizer = Arc::new(tokenizer);
    if ready.send(Ok((tokenizer.clone(), info))).is_err() {
        return;
    }
    drop(ready);
    let mut scheduler = Scheduler {
        states: StateCache::new(state_capacity),
        state_bytes,
        session: &mut session,
        tokenizer: &tokenizer,
        token_mask: OnceCell::new(),
        metrics: &metrics,
        prefill_chunk: cfg.prefill_chunk.max(1),
        admitted: 0,
        rate: VecDeque::new(),
    };
    scheduler.run(&mut slots, &jobs, cfg.step_delay);
}

/// Positions below this are not worth a saved state (each save ends a prefill chunk there).
const MIN_SAVED_POSITION: usize = 16;

/// One sequence's place in the scheduler: its states in every layer, the tokens they hold,
/// and the job it runs, if any.
struct Slot<'t> {
    seq: Sequence,
    /// The tokens `seq` holds, position by position (a later prompt that starts with some
    /// of them continues from there).
    cached: Vec<u32>,
    active: Option<Active<'t>>,
}

/// A job being generated.
struct Active<'t> {
    params: GenParams,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt then generated tokens (the sampler's repeat penalty looks at them).
    history: Vec<u32>,
    n_prompt: usize,
    /// Prompt tokens not yet prefilled: `history[n_prompt - pending..n_prompt]`.
    pending: usize,
    /// Positions still to come at which the slot saves its recurrent state, ascending
    /// (empty for a dense model).
    save_at: Vec<usize>,
    /// Admission order: prefill goes first come, first served.
    order: u64,
    /// Past this, the generation ends with `length` (`--timeout`).
    deadline: Option<Instant>,
    n_generated: usize,
    /// How often each generated token came (presence / frequency penalties).
    counts: HashMap<u32, u32>,
    /// Logits of the last position, `(vocab_size,)` (valid once `pending` is 0).
    logits: Vec<f32>,
    /// Where the output is in the grammar it must follow (`response_format`).
    matcher: Option<JsonMatcher>,
    streamer: TokenStreamer<'t>,
    /// Everything generated so far, and how much of it went out (text that could be the
    /// start of a stop string is held back).
    text: String,
    sent: usize,
}

/// The scheduler thread's loop and what it works with.
struct Scheduler<'s, 'm, 't> {
    session: &'s mut Session<'m>,
    tokenizer: &'t Tokenizer,
    /// Each token's bytes, for jobs whose output must follow a grammar: built by the first
    /// such job, so servers that never see one do not pay for it at start.
    token_mask: OnceCell<TokenMask>,
    metrics: &'s Metrics,
    /// Prompt tokens prefilled per round, over all slots.
    prefill_chunk: usize,
    /// Jobs admitted so far.
    admitted: u64,
    /// The slots' saved recurrent states (hybrid models), and the bytes of one.
    states: StateCache,
    state_bytes: usize,
    /// (time, tokens generated so far) after each round of the last [`RATE_WINDOW`].
    rate: VecDeque<(Instant, u64)>,
}

/// The span `edgefusion_tokens_per_second` averages over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

impl<'t> Scheduler<'_, '_, 't> {
    fn run(&mut self, slots: &mut [Slot<'t>], jobs: &Receiver<Job>, step_delay: Duration) {
        loop {
            // Idle: block for the next job (Err: every sender is gone, shut down).
            if slots.iter().all(|s| s.active.is_none()) {
                self.rate.clear();
                self.metrics.tokens_per_second.store(0, Ordering::Relaxed);
                match jobs.recv() {
                    Ok(job) => self.admit(slots, job),
                    Err(_) => return,
                }
            }
            // Fill the other free slots from the queue without waiting.
            while slots.iter().any(|s| s.active.is_none()) {
                match jobs.try_recv() {
                    Ok(job) => self.admit(slots, job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled(slots);
            self.step(slots);
            self.record_rate();
            self.metrics.active_slots.store(
                slots.iter().filter(|s| s.active.is_some()).count(),
                Ordering::SeqCst,
            );
            if !step_delay.is_zero() {
                std::thread::sleep(step_delay);
            }
        }
    }

    /// Starts `job` in the free slot whose cached tokens share the longest prefix with its
    /// prompt, keeping that prefix: a dense model cuts its KV cache back to it; a model with
    /// constant-size states keeps the whole cached sequence when it is a prefix of the
    /// prompt (a conversation's next turn), else returns to the latest state it saved within
    /// the shared prefix ([`StateCache`]), else starts over.
    fn admit(&mut self, slots: &mut [Slot<'t>], job: Job) {
        let metrics = self.metrics;
        metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            metrics.release();
            return;
        }
        if job.deadline.is_some_and(|d| Instant::now() >= d) {
            metrics.timed_out.fetch_add(1, Ordering::Relaxed);
            metrics.release();
            let _ = job.events.send(Event::TimedOut(
                "the request timed out waiting for a free slot (the server's --timeout): retry later"
                    .into(),
            ));
            return;
        }
        let states = &self.states;
        // (positions kept, whether from a saved state)
        let reusable = |i: usize, slot: &Slot<'_>| {
            let common = common_prefix(&slot.cached, &job.prompt);
            // At least the prompt's last token is fed: its logits start the generation.
            let keep = common.min(job.prompt.len().saturating_sub(1));
            if slot.seq.has_recurrent_state() && keep < slot.cached.len() {
                states.best(i, keep).map_or((0, false), |at| (at, true))
            } else {
                (keep, false)
            }
        };
        // Ties go to the slot that caches least, keeping longer caches for later requests.
        let Some((index, (keep, saved))) = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| (i, reusable(i, s)))
            .max_by_key(|&(i, (keep, _))| (keep, std::cmp::Reverse(slots[i].cached.len())))
        else {
            unreachable!("a job is admitted only when a slot is free")
        };
        let slot = &mut slots[index];
        let kept_in_place = if saved {
            self.states.use_state(index, keep).is_some_and(|state| {
                self.session
                    .restore_sequence_state(&mut slot.seq, state)
                    .is_ok()
            })
        } else {
            slot.seq.truncate(keep).is_ok()
        };
        if !kept_in_place {
            slot.seq.reset();
        }
        slot.cached.truncate(slot.seq.n_past());
        let kept = slot.seq.n_past();
        // The rows after `kept` are about to hold other tokens; the states before them are
        // in use again.
        self.states.forget_after(index, kept);
        self.states.touch(index);
        self.publish_state_metrics();
        metrics
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
        metrics
            .prompt_tokens_cached
            .fetch_add(kept as u64, Ordering::Relaxed);
        self.admitted += 1;
        let save_at = if slot.seq.has_recurrent_state() && self.states.capacity() > 0 {
            let mut at: Vec<usize> = job
                .boundaries
                .iter()
                .copied()
                .chain(job.prompt.len().checked_sub(1))
                // A state of a few tokens saves less than the round it costs.
                .filter(|&p| p > kept.max(MIN_SAVED_POSITION) && p < job.prompt.len())
                .collect();
            at.sort_unstable();
            at.dedup();
            at
        } else {
            Vec::new()
        };
        slot.active = Some(Active {
            sampler: Sampler::new(
                job.params.sampler.clone(),
                self.session.model().config.vocab_size,
            ),
            n_prompt: job.prompt.len(),
            pending: job.prompt.len() - kept,
            save_at,
            deadline: job.deadline,
            matcher: job.params.json.clone().map(JsonMatcher::new),
            order: self.admitted,
            history: job.prompt,
            params: job.params,
            events: job.events,
            n_generated: 0,
            counts: HashMap::new(),
            logits: Vec::new(),
            streamer: self.tokenizer.streamer(),
            text: String::new(),
            sent: 0,
        });
    }

    fn publish_state_metrics(&self) {
        if self.states.capacity() == 0 {
            // Nothing is ever saved: the gauges stay 0.
            return;
        }
        let held = self.states.len();
        self.metrics.saved_states.store(held, Ordering::Relaxed);
        self.metrics
            .saved_state_bytes
            .store(held * self.state_bytes, Ordering::Relaxed);
        self.metrics
            .saved_states_evicted
            .store(self.states.evicted, Ordering::Relaxed);
    }

    /// Updates `tokens_per_second` with this round's count of generated tokens.
    fn record_rate(&mut self) {
        let now = Instant::now();
        let total = self.metrics.tokens_generated.load(Ordering::Relaxed);
        self.rate.push_back((now, total));
        while self
            .rate
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > RATE_WINDOW)
        {
            self.rate.pop_front();
        }
        let (t0, n0) = self.rate[0];
        let seconds = now.duration_since(t0).as_secs_f64();
        let rate = if seconds > 0.0 {
            (total - n0) as f64 / seconds
        } else {
            0.0
        };
        self.metrics
            .tokens_per_second
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Frees the slots whose client went away.
    fn drop_cancelled(&mut self, slots: &mut [Slot<'t>]) {
        for slot in slots.iter_mut() {
            if slot.active.as_ref().is_some_and(|a| a.events.is_closed()) {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                self.metrics.release();
                slot.active = None;
            }
        }
    }

    /// One round: every slot whose prompt is in samples its next token and sends the text
    /// it completes; then one batched step feeds those tokens together with up to
    /// `prefill_chunk` prompt tokens of the slots still prefilling (first admitted first), so
    /// a long prompt takes several rounds and the other streams decode a token in each.
    fn step(&mut self, slots: &mut [Slot<'t>]) {
        let n_ctx = self.session.n_ctx();
        let now = Instant::now();
        // (slot, tokens fed, whether they are decode tokens)
        let mut batch: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            let finish = if active.deadline.is_some_and(|d| now >= d) {
                self.metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                Some(FinishReason::Length)
            } else if active.pending > 0 {
                continue;
            } else {
                match sample_next(active, self.tokenizer, &self.token_mask, self.metrics) {
                    Step::Finished(reason) => Some(reason),
                    Step::Continue(_) if slot.seq.n_past() >= n_ctx => Some(FinishReason::Length),
                    Step::Continue(next) => {
                        batch.push((i, vec![next], true));
                        None
                    }
                }
            };
            if let Some(reason) = finish {
                if let Some(active) = slot.active.take() {
                    // Released first: a client that sends its next request the moment this
                    // one ends must find room.
                    self.metrics.release();
                    finish_job(active, reason);
                }
            }
        }
        let mut prefilling: Vec<(u64, usize)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.active
                    .as_ref()
                    .filter(|a| a.pending > 0)
                    .map(|a| (a.order, i))
            })
            .collect();
        prefilling.sort_unstable();
        // The step holds at most max_batch tokens (the session clamps it to the context).
        let room = self.session.options().max_batch.saturating_sub(batch.len());
        let mut budget = self.prefill_chunk.min(room);
        for (_, i) in prefilling {
            if budget == 0 {
                break;
            }
            let Some(active) = slots[i].active.as_ref() else {
                continue;
            };
            let start = active.n_prompt - active.pending;
            let mut n = active.pending.min(budget);
            // A chunk ends where the slot saves its state.
            if let Some(&at) = active.save_at.first() {
                n = n.min(at - start);
            }
            batch.push((i, active.history[start..start + n].to_vec(), false));
            budget -= n;
        }
        if batch.is_empty() {
            return;
        }
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|(_, t, _)| t.iter().copied())
            .collect();
        let lens: Vec<usize> = batch.iter().map(|(_, t, _)| t.len()).collect();
        // The sequences in the batch's order (slots are borrowed one by one, disjointly).
        let mut by_slot: Vec<Option<&mut Sequence>> =
            slots.iter_mut().map(|s| Some(&mut s.seq)).collect();
        let mut seqs: Vec<&mut Sequence> = batch
            .iter()
            .filter_map(|(i, _, _)| by_slot[*i].take())
            .collect();
        let vocab = self.session.model().config.vocab_size;
        let n_decode = batch.iter().filter(|b| b.2).count();
        // Slots whose chunk ended where they save their state.
        let mut to_save = Vec::new();
        match self.session.forward_batch(&mut seqs, &tokens, &lens) {
            Ok(logits) => {
                if n_decode > 0 {
                    self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .decode_rows
                        .fetch_add(n_decode as u64, Ordering::Relaxed);
                }
                for ((i, fed, decoding), row) in batch.iter().zip(logits.chunks_exact(vocab)) {
                    let slot = &mut slots[*i];
                    slot.cached.extend_from_slice(fed);
                    if let Some(active) = slot.active.as_mut() {
                        if !decoding {
                            active.pending -= fed.len();
                            if active.save_at.first() == Some(&slot.seq.n_past()) {
                                active.save_at.remove(0);
                                to_save.push(*i);
                            }
                        }
                        // The logits after the prompt's last token start the generation.
                        if active.pending == 0 {
                            active.logits.clear();
                            active.logits.extend_from_slice(row);
                        }
                    }
                }
            }
            Err(e) => {
                // Checked beforehand, so this is a bug: fail the round's jobs, keep serving.
                for (i, _, _) in &batch {
                    let slot = &mut slots[*i];
                    if let Some(active) = slot.active.take() {
                        let _ = active.events.send(Event::Error(e.to_string()));
                        self.metrics.release();
                    }
                    slot.seq.reset();
                    slot.cached.clear();
                    self.states.forget_after(*i, 0);
                }
            }
        }
        for i in to_save {
            let state = self.session.sequence_state(&slots[i].seq);
            self.states.save(i, state);
        }
        self.publish_state_metrics();
    }
}

/// Length of the longest common prefix.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

enum Step {
    Continue(u32),
    Finished(FinishReason),
}

/// Samples, records and streams one token of `active`; with a grammar, only among the
/// tokens that keep the output valid (end of generation only once it is whole).
fn sample_next(
    active: &mut Active<'_>,
    tokenizer: &Tokenizer,
    token_mask: &OnceCell<TokenMask>,
    metrics: &Metrics,
) -> Step {
    let token_mask = active
        .matcher
        .is_some()
        .then(|| token_mask.get_or_init(|| TokenMask::new(tokenizer)));
    let p = &active.params;
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        for (&token, &count) in &active.counts {
            if let Some(l) = active.logits.get_mut(token as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
    }
    if let (Some(matcher), Some(token_mask)) = (&active.matcher, token_mask) {
        if token_mask.apply(matcher, &mut active.logits) == 0 {
            // The vocabulary cannot write any byte the grammar takes next.
            let _ = active.events.send(Event::Error(
                "no token of the vocabulary can continue the JSON output".into(),
            ));
            return Step::Finished(FinishReason::Stop);
        }
    }
    let mut next = active.sampler.sample(&active.logits, &active.history);
    if let (Some(matcher), Some(token_mask)) = (&mut active.matcher, token_mask) {
        // Sampling filters may keep a masked token at a vanishing probability: never take it.
        if !token_mask.allows(matcher, next) {
            next = argmax(&active.logits);
        }
        if !tokenizer.is_eos(next) {
            matcher.feed(token_mask.token_bytes(next));
        }
    }
    if tokenizer.is_eos(next) {
        return Step::Finished(FinishReason::Stop);
    }
    if let Some(top) = active.params.logprobs {
        let entry = token_logprob(tokenizer, &active.logits, next, top);
        let _ = active.events.send(Event::Logprob(entry));
    }
    active.history.push(next);
    active.n_generated += 1;
    *active.counts.entry(next).or_insert(0) += 1;
    metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
    match active.streamer.push(next) {
        Ok(Some(piece)) => active.text.push_str(&piece),
        Ok(None) => {}
        Err(e) => {
            let _ = active.events.send(Event::Error(e.to_string()));
            return Step::Finished(FinishReason::Stop);
        }
    }
    if flush_text(active, false) {
        return Step::Finished(FinishReason::Stop);
    }
    // A whole JSON document that nothing may follow: done, without a step for the end token.
    if active.matcher.as_ref().is_some_and(JsonMatcher::finished) {
        return Step::Finished(FinishReason::Stop);
    }
    if active.n_generated >= active.params.max_tokens {
        return Step::Finished(FinishReason::Length);
    }
    Step::Continue(next)
}

/// Sends the text that can no longer become part of a stop string; at a stop string, sends
/// the text before it, drops the rest and returns true. `at_end`: hold nothing back.
fn flush_text(active: &mut Active<'_>, at_end: bool) -> bool {
    let (end, stopped) = match find_stop(&active.text, active.sent, &active.params.stop) {
        Some(at) => (at, true),
        None if at_end => (active.text.len(), false),
        None => (safe_end(&active.text, &active.params.stop), false),
    };
    if end > active.sent {
        let _ = active
            .events
            .send(Event::Text(active.text[active.sent..end].to_string()));
        active.sent = end;
    }
    if stopped {
        active.text.truncate(end);
    }
    stopped
}

/// Byte offset of the earliest stop string that ends after `from` (a stop may straddle text
/// already sent only by its held-back part, so searching from `from` suffices).
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

/// The end of the text that no stop string can start in: before the longest suffix that is
/// a proper prefix of some stop string.
fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    for stop in stops {
        for k in (1..stop.len().min(text.len() + 1)).rev() {
            let start = text.len() - k;
            if text.is_char_boundary(start) && stop.starts_with(&text[start..]) {
                end = end.min(start);
                break;
            }
        }
    }
    end
}

fn finish_job(mut active: Active<'_>, reason: FinishReason) {
    let mut reason = reason;
    if let Some(rest) = active.streamer.finish() {
        active.text.push_str(&rest);
    }
    if flush_text(&mut active, true) {
        reason = FinishReason::Stop;
    }
    let _ = active.events.send(Event::Done {
        reason,
        prompt_tokens: active.n_prompt,
        completion_tokens: active.n_generated,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(safe_end("hello", &stops), 5);
        assert_eq!(safe_end("hello\n", &stops), 5);
        assert_eq!(safe_end("hello EN", &stops), 6);
        assert_eq!(find_stop("ab END cd", 0, &stops), Some(3));
        assert_eq!(find_stop("ab\n\ncd END", 0, &stops), Some(2));
        assert_eq!(find_stop("abc", 0, &stops), None);
        // Multi-byte text before a partial stop keeps char boundaries.
        assert_eq!(safe_end("héllo E", &["EOF".to_string()]), 7);
    }
}
