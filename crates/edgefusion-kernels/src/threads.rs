//! A fork-join pool of worker threads for the engine's parallel loops.
//!
//! Decoding one token runs ~150 short parallel loops (a matmul of a few hundred rows each);
//! waking threads through a general-purpose scheduler costs more than some of those loops.
//! So workers spin on an epoch counter between loops, and publishing a loop costs one atomic
//! increment, as in llama.cpp's thread pool. Two rules keep that from collapsing when other
//! programs share the CPUs (a phone's UI, a laptop's browser):
//!
//! - **Work is taken, not assigned.** A loop is `n_tasks` tasks; every thread, the caller
//!   included, takes the next task from an atomic counter until none is left, and the loop
//!   ends when every task is done, not when every worker has checked in. A worker that the
//!   operating system has descheduled simply takes no task, and whoever runs does its share;
//!   the caller waits for tasks already being worked on, and (in the close handshake below)
//!   for a worker caught between registering and backing off.
//! - **Spinning is brief.** An idle worker spins for [`SPIN`], then yields its time slice for
//!   [`YIELD`] (so a descheduled partner can run on this CPU), then sleeps on a condition
//!   variable until the next loop is published.
//!
//! When a second thread is a loss anyway (the machine is busy), the engine can lower the
//! number of threads that take part in loops ([`ThreadPool::set_active_threads`]): the others
//! sleep at once instead of spinning. To tell it when that may pay, the pool sums the time its
//! caller waited for descheduled partners ([`ThreadPool::stalled`]).
//!
//! The protocol between a loop and its workers: `epoch` is odd while a loop is open. `run`
//! writes the job, then opens the epoch; a worker that sees an open epoch it has not joined
//! registers in `active`, checks that the epoch is still the one it saw, and only then reads
//! the job. `run` closes the epoch once every task is done and waits for `active` to drain
//! before the job's borrow ends, so no worker can touch a job after `run` returns, however
//! late it wakes up.

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next loop before it yields.
const SPIN: Duration = Duration::from_micros(200);
/// How long it then yields its time slice before it sleeps.
const YIELD: Duration = Duration::from_millis(2);
/// Spin iterations between clock reads.
const SPINS_PER_CHECK: usize = 64;
/// A wait of the caller for its partners longer than this counts as a stall: imbalance
/// between running threads costs microseconds, a partner the operating system descheduled
/// costs a time slice (milliseconds).
const STALL: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize) + Sync;

/// The job of the open loop: written by `for_each_task` while the epoch is even, read by
/// workers only after they registered in `active` and saw the epoch still open.
struct JobSlot(UnsafeCell<Option<*const Job>>);

// SAFETY: the slot is written only while no worker can read it: the epoch is even, and every
// worker registered before the previous loop's close has left (`active` drained then); one
// registering later sees an epoch other than the one it joined and backs off without reading.
// The epoch's SeqCst store/load orders the write before every read; the pointee is `Sync`.
unsafe impl Sync for JobSlot {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for JobSlot {}

struct Shared {
    n_threads: usize,
    /// Threads taking part in loops: the caller and workers `1..active_threads`.
    active_threads: AtomicUsize,
    /// Nanoseconds the caller waited in stalls (see [`STALL`]).
    stalled_nanos: AtomicU64,
    /// Odd while a loop is open; incremented to open and again to close each loop.
    epoch: AtomicUsize,
    job: JobSlot,
    /// Tasks of the open loop.
    n_tasks: AtomicUsize,
    /// The next task index to take.
    next: AtomicUsize,
    /// Tasks finished (or panicked).
    completed: AtomicUsize,
    /// Workers between their registration and their exit from a loop.
    active: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// The open loop that worker `tid` should join: one it has not joined, while it is
    /// among the active threads.
    fn open_epoch_to_join(&self, tid: usize, joined: usize) -> Option<usize> {
        let epoch = self.epoch.load(SeqCst);
        (epoch & 1 == 1 && epoch != joined && tid < self.active_threads.load(SeqCst))
            .then_some(epoch)
    }

    /// Takes and runs tasks of `job` until none is left.
    fn drain(&self, job: &(dyn Fn(usize) + Sync)) -> Option<Box<dyn std::any::Any + Send>> {
        let n_tasks = self.n_tasks.load(SeqCst);
        let mut first_panic = None;
        loop {
            let task = self.next.fetch_add(1, SeqCst);
            if task >= n_tasks {
                return first_panic;
            }
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| job(task))) {
                self.panicked.store(true, SeqCst);
                if first_panic.is_none() {
                    first_panic = Some(payload);
                } else {
                    // Dropping a payload can itself panic; leaking it cannot.
                    std::mem::forget(payload);
                }
            }
            self.completed.fetch_add(1, SeqCst);
        }
    }
}

/// Waits until `done()`: spins for [`SPIN`], then yields the time slice (the thread it waits
/// for may be queued on this CPU).
fn wait_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    let mut spins = 0usize;
    while !done() {
        spins += 1;
        if !spins.is_multiple_of(SPINS_PER_CHECK) || start.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// `n_threads - 1` workers plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `for_each_task` calls: there is one job slot.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n_threads` (≥ 1) threads, the caller included.
    pub fn new(n_threads: usize) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            active_threads: AtomicUsize::new(n_threads),
            stalled_nanos: AtomicU64::new(0),
            epoch: AtomicUsize::new(0),
            job: JobSlot(UnsafeCell::new(None)),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(n_threads - 1),
            run_lock: Mutex::new(()),
        };
        for tid in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            // On an error `pool` is dropped here, which stops the workers already started.
            pool.workers.push(
                std::thread::Builder::new()
                    .name(format!("edgefusion-{tid}"))
                    .spawn(move || worker(&shared, tid))?,
            );
        }
        Ok(pool)
    }

    /// Threads of the pool, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Threads that take part in the next loops (see [`ThreadPool::set_active_threads`]).
    pub fn active_threads(&self) -> usize {
        self.shared.active_threads.load(SeqCst)
    }

    /// Lets only `n` threads (clamped to `1..=n_threads`), the caller and workers `1..n`,
    /// take part in the next loops; the other workers sleep until the count is raised. Call
    /// it between loops, from the thread that runs them.
    pub fn set_active_threads(&self, n: usize) {
        let n = n.clamp(1, self.shared.n_threads);
        // Stored only when it changes: the spinning workers read this cache line.
        if self.shared.active_threads.load(SeqCst) != n {
            self.shared.active_threads.store(n, SeqCst);
        }
    }

    /// Total time the caller has waited in stalls: for a partner descheduled in the middle of
    /// its task, or between joining a loop and backing off, for longer than [`STALL`].
    pub fn stalled(&self) -> Duration {
        Duration::from_nanos(self.shared.stalled_nanos.load(SeqCst))
    }

    /// Runs `f(task)` for every task in `0..n_tasks`, each exactly once, on whichever threads
    /// of the pool are running (the caller takes tasks too), and returns when all are done.
    ///
    /// A task must not call `for_each_task` on the same pool (with 2 or more tasks): the pool
    /// runs one loop at a time, and the nested call would wait for the outer one forever.
    ///
    /// # Panics
    /// If `f` panicked on any task (after every other task has run).
    pub fn for_each_task(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;
        if shared.active_threads.load(SeqCst) == 1 || n_tasks <= 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erases the borrow's lifetime. Workers dereference the pointer only while
        // registered in `active` under this loop's open epoch, and this function neither
        // returns nor unwinds (tasks run under catch_unwind) before it closed the epoch and
        // saw `active` drain, so `f` outlives every use.
        let erased: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        // SAFETY: the epoch is even and every worker of the previous loop has left (its close
        // waited for that), so no worker reads the slot now (see `JobSlot`).
        unsafe { *shared.job.0.get() = Some(erased) };
        shared.n_tasks.store(n_tasks, SeqCst);
        shared.next.store(0, SeqCst);
        shared.completed.store(0, SeqCst);
        shared.epoch.fetch_add(1, SeqCst); // open
        if shared.sleepers.load(SeqCst) > 0 {
            // A worker counts itself in `sleepers` before it re-checks the epoch under the
            // lock, so either it sees the open epoch or this notification reaches it.
            let _lock = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let caller_panic = shared.drain(f);
        // Only tasks already taken can be outstanding: wait for their threads to finish them.
        let waiting = (shared.completed.load(SeqCst) < n_tasks).then(Instant::now);
        wait_until(|| shared.completed.load(SeqCst) >= n_tasks);
        shared.epoch.fetch_add(1, SeqCst); // close
        let waiting = waiting.or_else(|| (shared.active.load(SeqCst) > 0).then(Instant::now));
        wait_until(|| shared.active.load(SeqCst) == 0);
        if let Some(waited) = waiting.map(|start| start.elapsed()) {
            if waited > STALL {
                let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
                shared.stalled_nanos.fetch_add(nanos, SeqCst);
            }
        }
        // SAFETY: the epoch is closed and no worker is active, so none reads the slot.
        unsafe { *shared.job.0.get() = None };
        let worker_panicked = shared.panicked.swap(false, SeqCst);
        if let Some(payload) = caller_panic {
            panic::resume_unwind(payload);
        }
        if worker_panicked {
            panic!("a worker thread panicked in a parallel loop");
        }
    }

    /// Calls `f(index, chunk)` for consecutive `chunk_len`-long chunks of `data` (the last may
    /// be shorter), spread over the pool's threads.
    pub fn for_chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        self.for_chunks_mut2(data, chunk_len, &mut [] as &mut [u8], 0, |i, a, _| f(i, a));
    }

    /// Like [`ThreadPool::for_chunks_mut`], also handing the `i`-th chunk the `i`-th
    /// `b_chunk_len`-long chunk of `b` (empty when `b` is shorter).
    pub fn for_chunks_mut2<A: Send, B: Send>(
        &self,
        a: &mut [A],
        a_chunk_len: usize,
        b: &mut [B],
        b_chunk_len: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let a_chunk_len = a_chunk_len.max(1);
        let n_chunks = a.len().div_ceil(a_chunk_len);
        if self.active_threads() == 1 || n_chunks <= 1 {
            let mut b_chunks = b.chunks_mut(b_chunk_len.max(1));
            for (i, chunk) in a.chunks_mut(a_chunk_len).enumerate() {
                f(i, chunk, b_chunks.next().unwrap_or(&mut []));
            }
            return;
        }
        let (a_len, b_len) = (a.len(), b.len());
        let (a_ptr, b_ptr) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        self.for_each_task(n_chunks, &|i| {
            let a_start = i * a_chunk_len;
            let a_end = (a_start + a_chunk_len).min(a_len);
            let b_start = (i * b_chunk_len).min(b_len);
            let b_end = (b_start + b_chunk_len).min(b_len);
            // SAFETY: each task index i runs exactly once, the ranges of distinct i are
            // disjoint and within the slices, which stay mutably borrowed until
            // `for_each_task` returns.
            let (a_chunk, b_chunk) = unsafe {
                (
                    std::slice::from_raw_parts_mut(a_ptr.get().add(a_start), a_end - a_start),
                    std::slice::from_raw_parts_mut(b_ptr.get().add(b_start), b_end - b_start),
                )
            };
            f(i, a_chunk, b_chunk);
        });
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _lock = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that may cross threads (the chunking protocol above keeps accesses disjoint).
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: used only by `for_chunks_mut2`, whose threads touch disjoint ranges.
unsafe impl<T: Send> Sync for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SendPtr<T> {}

/// Worker `tid` (1..n_threads; the caller is thread 0).
fn worker(shared: &Shared, tid: usize) {
    let mut joined = 0usize;
    loop {
        // Wait for an open loop this worker has not joined: spin, yield, then sleep (at once
        // while it is not among the active threads).
        let start = Instant::now();
        let mut spins = 0usize;
        let epoch = loop {
            if shared.shutdown.load(SeqCst) {
                return;
            }
            if let Some(epoch) = shared.open_epoch_to_join(tid, joined) {
                break epoch;
            }
            spins += 1;
            let inactive = tid >= shared.active_threads.load(SeqCst);
            if !inactive && !spins.is_multiple_of(SPINS_PER_CHECK) {
                std::hint::spin_loop();
                continue;
            }
            let idle = start.elapsed();
            if !inactive && idle < SPIN {
                std::hint::spin_loop();
            } else if !inactive && idle < SPIN + YIELD {
                std::thread::yield_now();
            } else {
                let mut lock = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, SeqCst);
                while shared.open_epoch_to_join(tid, joined).is_none()
                    && !shared.shutdown.load(SeqCst)
                {
                    lock = shared.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, SeqCst);
            }
        };
        joined = epoch;
        shared.active.fetch_add(1, SeqCst);
        // Still the loop we saw? If it closed meanwhile, its job may be gone.
        if shared.epoch.load(SeqCst) == epoch {
            // SAFETY: registered in `active` under the open epoch that published the slot:
            // `for_each_task` keeps the job alive until it sees `active` drain.
            let job = unsafe { *shared.job.0.get() };
            if let Some(job) = job {
                // SAFETY: as above, the pointee outlives this call.
                if let Some(payload) = shared.drain(unsafe { &*job }) {
                    // Reported through `panicked`; dropping a payload can itself panic.
                    std::mem::forget(payload);
                }
            }
        }
        shared.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once_with_its_scratch() {
        for n_threads in [1, 2, 3] {
            let pool = ThreadPool::new(n_threads).unwrap();
            for len in [0usize, 1, 7, 64, 1000] {
                let mut data = vec![0u32; len];
                let mut scratch = vec![0u32; len.div_ceil(5) * 2];
                for _ in 0..3 {
                    pool.for_chunks_mut2(&mut data, 5, &mut scratch, 2, |i, chunk, s| {
                        for (j, v) in chunk.iter_mut().enumerate() {
                            *v += (i * 5 + j) as u32;
                        }
                        for v in s.iter_mut() {
                            *v += 1;
                        }
                    });
                }
                assert!(data.iter().enumerate().all(|(k, &v)| v == 3 * k as u32));
                assert!(scratch.iter().all(|&v| v == 3));
            }
        }
    }

    /// Many short loops back to back, on more threads than this machine may have cores (so
    /// workers are descheduled mid-loop and join loops late): every task runs exactly once.
    #[test]
    fn every_task_runs_once_under_oversubscription() {
        let pool = ThreadPool::new(8).unwrap();
        let counts: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        let mut expected = vec![0usize; 64];
        for round in 0..3000 {
            let n_tasks = round % 65;
            pool.for_each_task(n_tasks, &|t| {
                counts[t].fetch_add(1, SeqCst);
            });
            expected[..n_tasks].iter_mut().for_each(|e| *e += 1);
            if round % 1000 == 999 {
                // Let the workers fall asleep between some loops.
                std::thread::sleep(SPIN + YIELD + Duration::from_millis(5));
            }
        }
        let got: Vec<usize> = counts.iter().map(|c| c.load(SeqCst)).collect();
        assert_eq!(got, expected);
    }

    /// Work is taken, not assigned: while one thread is stuck in a task, the others finish
    /// every other task (with tasks assigned per thread, task 0's thread would own more).
    #[test]
    fn other_threads_take_the_work_of_a_stuck_one() {
        for n_threads in [2, 3] {
            let pool = ThreadPool::new(n_threads).unwrap();
            let n_tasks = 40;
            let done = AtomicUsize::new(0);
            pool.for_each_task(n_tasks, &|t| {
                if t == 0 {
                    let start = Instant::now();
                    while done.load(SeqCst) < n_tasks - 1 {
                        assert!(
                            start.elapsed() < Duration::from_secs(20),
                            "the other tasks were not taken by the other threads"
                        );
                        std::thread::yield_now();
                    }
                }
                done.fetch_add(1, SeqCst);
            });
            assert_eq!(done.load(SeqCst), n_tasks);
        }
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_loop() {
        let pool = ThreadPool::new(3).unwrap();
        let threads_seen = Mutex::new(std::collections::HashSet::new());
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(20));
        // Each task waits a little, so a sleeping worker has time to wake and take one.
        pool.for_each_task(300, &|_| {
            threads_seen
                .lock()
                .unwrap()
                .insert(std::thread::current().id());
            std::thread::sleep(Duration::from_micros(200));
        });
        assert!(threads_seen.lock().unwrap().len() >= 2, "no worker woke up");
    }

    /// Only the active threads take tasks; workers left out sleep, and join again (woken)
    /// once the count is raised.
    #[test]
    fn only_active_threads_take_tasks() {
        let pool = ThreadPool::new(3).unwrap();
        let caller = std::thread::current().id();
        let names_seen = |pool: &ThreadPool| {
            let seen = Mutex::new(std::collections::BTreeSet::new());
            pool.for_each_task(200, &|_| {
                let me = std::thread::current();
                let name = if me.id() == caller {
                    "caller".to_string()
                } else {
                    me.name().unwrap_or("?").to_string()
                };
                seen.lock().unwrap().insert(name);
                std::thread::sleep(Duration::from_micros(300));
            });
            seen.into_inner().unwrap()
        };
        for (active, allowed) in [
            (1, &["caller"][..]),
            (2, &["caller", "edgefusion-1"]),
            (1, &["caller"]),
            (3, &["caller", "edgefusion-1", "edgefusion-2"]),
        ] {
            pool.set_active_threads(active);
            assert_eq!(pool.active_threads(), active);
            let seen = names_seen(&pool);
            assert!(
                seen.iter().all(|n| allowed.contains(&n.as_str())),
                "{active} active threads: tasks ran on {seen:?}"
            );
            if active > 1 {
                assert!(
                    seen.len() >= 2,
                    "{active} active threads: no worker woke up"
                );
            }
            // Let the workers left out fall asleep.
            std::thread::sleep(SPIN + YIELD + Duration::from_millis(5));
        }
        pool.set_active_threads(0);
        assert_eq!(pool.active_threads(), 1, "at least the caller runs");
        pool.set_active_threads(9);
        assert_eq!(pool.active_threads(), 3, "at most the pool's threads");
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_stays_usable() {
        let pool = ThreadPool::new(2).unwrap();
        for bad in [0, 7, 63] {
            let ran = AtomicUsize::new(0);
            let result = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.for_each_task(64, &|t| {
                    ran.fetch_add(1, SeqCst);
                    if t == bad {
                        panic!("boom");
                    }
                })
            }));
            assert!(result.is_err());
            assert_eq!(ran.load(SeqCst), 64, "the other tasks still ran");
        }
        let hits = AtomicUsize::new(0);
        pool.for_each_task(10, &|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 10);
    }
}
