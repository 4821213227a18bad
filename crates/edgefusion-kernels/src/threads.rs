//! A fork-join pool of spinning worker threads for the engine's parallel loops.
//!
//! Decoding one token runs ~150 short parallel loops (a matmul of a few hundred rows each);
//! waking threads through a general-purpose scheduler costs more than some of those loops.
//! Here workers spin on an epoch counter between loops (and sleep after a few milliseconds
//! idle), so publishing a loop costs one atomic increment, as in llama.cpp's thread pool.

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins before a worker goes to sleep (a few milliseconds).
const SPINS_BEFORE_SLEEP: usize = 1 << 16;

type Job = dyn Fn(usize) + Sync;

/// The job slot: written by `run` before it publishes a new epoch, read by workers after they
/// observe it, cleared after every worker reported done.
struct JobSlot(UnsafeCell<Option<*const Job>>);

// SAFETY: the slot is only written while no worker reads it (before the epoch is published
// and after all workers finished), and the epoch's SeqCst store/load orders the write before
// every read; the pointee is `Sync`.
unsafe impl Sync for JobSlot {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for JobSlot {}

struct Shared {
    n_threads: usize,
    epoch: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    job: JobSlot,
    sleeping: Mutex<usize>,
    wake: Condvar,
}

/// `n_threads - 1` workers plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls: there is one job slot.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n_threads` (≥ 1) threads, the caller included.
    pub fn new(n_threads: usize) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            job: JobSlot(UnsafeCell::new(None)),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for tid in 1..n_threads {
            let shared = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("edgefusion-{tid}"))
                    .spawn(move || worker(&shared, tid))?,
            );
        }
        Ok(ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        })
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index)` once on every thread of the pool (index 0 is the caller) and
    /// returns when all are done.
    ///
    /// # Panics
    /// If `f` panicked on any thread.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;
        if shared.n_threads == 1 {
            f(0);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        shared.done.store(0, SeqCst);
        // SAFETY: erases the borrow's lifetime. Workers dereference the pointer only between
        // the epoch increment below and their `done` increment, and this function does not
        // return (nor unwind: the caller's part runs under catch_unwind) before `done` counts
        // every worker, so `f` outlives every use.
        let erased: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        // SAFETY: no worker reads the slot now: the previous job's workers all reported done.
        unsafe { *shared.job.0.get() = Some(erased) };
        shared.epoch.fetch_add(1, SeqCst);
        {
            let sleeping = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            if *sleeping > 0 {
                shared.wake.notify_all();
            }
        }
        let caller = panic::catch_unwind(AssertUnwindSafe(|| f(0)));
        let mut spins = 0usize;
        while shared.done.load(SeqCst) < shared.n_threads - 1 {
            spins += 1;
            if spins < SPINS_BEFORE_SLEEP {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker reported done, so none reads the slot.
        unsafe { *shared.job.0.get() = None };
        if let Err(payload) = caller {
            panic::resume_unwind(payload);
        }
        if shared.panicked.swap(false, SeqCst) {
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
        if self.n_threads() == 1 || n_chunks <= 1 {
            let mut b_chunks = b.chunks_mut(b_chunk_len.max(1));
            for (i, chunk) in a.chunks_mut(a_chunk_len).enumerate() {
                f(i, chunk, b_chunks.next().unwrap_or(&mut []));
            }
            return;
        }
        let (a_len, b_len) = (a.len(), b.len());
        let (a_ptr, b_ptr) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        let next = AtomicUsize::new(0);
        self.run(&|_tid| loop {
            let i = next.fetch_add(1, SeqCst);
            if i >= n_chunks {
                break;
            }
            let a_start = i * a_chunk_len;
            let a_end = (a_start + a_chunk_len).min(a_len);
            let b_start = (i * b_chunk_len).min(b_len);
            let b_end = (b_start + b_chunk_len).min(b_len);
            // SAFETY: each index i is taken by exactly one thread (atomic counter), and the
            // ranges of distinct i are disjoint and within the slices, which stay mutably
            // borrowed until `run` returns.
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
            let _sleeping = self
                .shared
                .sleeping
                .lock()
                .unwrap_or_else(|e| e.into_inner());
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

fn worker(shared: &Shared, tid: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            if shared.shutdown.load(SeqCst) {
                return;
            }
            let epoch = shared.epoch.load(SeqCst);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins += 1;
            if spins < SPINS_BEFORE_SLEEP {
                std::hint::spin_loop();
                continue;
            }
            let mut sleeping = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            *sleeping += 1;
            // Re-check under the lock: `run` publishes the epoch before it takes the lock.
            while shared.epoch.load(SeqCst) == seen && !shared.shutdown.load(SeqCst) {
                sleeping = shared
                    .wake
                    .wait(sleeping)
                    .unwrap_or_else(|e| e.into_inner());
            }
            *sleeping -= 1;
            spins = 0;
        }
        // SAFETY: the epoch we observed was published after the slot was written, and `run`
        // keeps the job alive until we increment `done` below.
        let job = unsafe { *shared.job.0.get() };
        if let Some(job) = job {
            // SAFETY: see above: the pointee outlives this call.
            let result = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(tid) }));
            if result.is_err() {
                shared.panicked.store(true, SeqCst);
            }
        }
        shared.done.fetch_add(1, SeqCst);
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

    #[test]
    fn run_reaches_every_thread_and_survives_sleeping_workers() {
        let pool = ThreadPool::new(3).unwrap();
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 3);
        // Let the workers fall asleep, then wake them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(&|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 6);
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_stays_usable() {
        let pool = ThreadPool::new(2).unwrap();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|tid| {
                if tid == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(result.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 2);
    }
}
