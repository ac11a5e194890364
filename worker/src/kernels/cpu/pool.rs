//! A fork-join thread pool for the forward pass.
//!
//! `run(&f)` calls `f(thread_index, num_threads)` once on every thread (the caller is index 0) and
//! returns when all calls have returned. A forward pass dispatches hundreds of small parallel
//! regions, so waking threads through the OS for each would cost more than the work: workers spin
//! for a short while after each job and only then sleep on a condition variable.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a waiting thread spins flat out before it starts yielding its core (back-to-back
/// parallel regions of one forward pass are closer together than this).
const SPIN: Duration = Duration::from_micros(50);
/// How long an idle worker keeps yielding before it sleeps on the condition variable.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(1500);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// The job of the current epoch; written by `run` before the epoch is bumped, read by workers
    /// after they observe the new epoch, and not touched again until every worker is done.
    job: UnsafeCell<Option<*const Job>>,
    epoch: AtomicU64,
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written by the single thread inside `run` while no worker reads it (all
// workers finished the previous epoch), and read by workers only between the epoch bump and their
// `pending` decrement, during which `run` keeps the pointee alive.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of threads that run one closure at a time, all together.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// Serialises concurrent `run` calls (the pool runs one job at a time).
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` threads in total, the calling thread included (at least 1).
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("lumen-cpu-{index}"))
                    .spawn(move || worker_loop(&shared, index, threads))
                    .expect("spawning a CPU kernel thread")
            })
            .collect();
        ThreadPool { shared, workers, threads, running: Mutex::new(()) }
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i, n)` for every thread index `i` in `0..n` and waits for all of them. A panic in
    /// any call is re-raised here after every thread has finished.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: &F) {
        if self.threads == 1 {
            f(0, 1);
            return;
        }
        let _serial = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let shared = &*self.shared;
        let job: *const (dyn Fn(usize, usize) + Sync + '_) = f;
        // SAFETY: the pointer is erased of its lifetime, but `run` does not return before every
        // worker has finished with it (the `pending` wait below, which also runs after a panic).
        unsafe {
            *shared.job.get() = Some(std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Job>(job))
        };
        shared.pending.store(self.threads - 1, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, self.threads)));
        // Spin briefly, then yield: on an oversubscribed machine a worker may share this core,
        // and spinning would starve the very thread we wait for.
        let waiting = Instant::now();
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && waiting.elapsed() > SPIN {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        unsafe { *shared.job.get() = None };
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU kernel thread panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker_loop(shared: &Shared, index: usize, threads: usize) {
    let mut seen = 0u64;
    loop {
        if !wait_for_epoch(shared, &mut seen) {
            return;
        }
        // SAFETY: see `Shared`; the job pointer is valid until we decrement `pending`.
        let job = unsafe { (*shared.job.get()).map(|p| &*p) };
        if let Some(job) = job
            && catch_unwind(AssertUnwindSafe(|| job(index, threads))).is_err()
        {
            shared.panicked.store(true, Ordering::SeqCst);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Waits until the epoch moves past `seen` (true) or the pool shuts down (false).
fn wait_for_epoch(shared: &Shared, seen: &mut u64) -> bool {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != *seen {
            *seen = epoch;
            return true;
        }
        if shared.shutdown.load(Ordering::Relaxed) {
            return false;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let idle = started.elapsed();
        if idle < SPIN {
            continue;
        }
        if idle < SPIN_BEFORE_SLEEP {
            std::thread::yield_now();
            continue;
        }
        let mut guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        shared.sleeping.fetch_add(1, Ordering::SeqCst);
        while shared.epoch.load(Ordering::SeqCst) == *seen && !shared.shutdown.load(Ordering::SeqCst) {
            guard = shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        shared.sleeping.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        return wait_for_epoch(shared, seen);
    }
}

/// The share of `0..len` that thread `index` of `threads` takes: contiguous, in multiples of
/// `align` (except the last), as even as the alignment allows.
pub fn split_range(len: usize, index: usize, threads: usize, align: usize) -> Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let per = units / threads;
    let extra = units % threads;
    let start_unit = index * per + index.min(extra);
    let end_unit = start_unit + per + usize::from(index < extra);
    (start_unit * align).min(len)..(end_unit * align).min(len)
}

/// A raw pointer that may cross into pool threads; each thread must touch a disjoint part.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
unsafe impl<T> Send for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the raw field).
    #[inline(always)]
    pub fn get(&self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Sync for SharedMut<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let hits = [const { AtomicUsize::new(0) }; 3];
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(round + 1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), round + 1);
            }
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN_BEFORE_SLEEP * 4);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_keeps_working() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(&|i, _| assert!(i != 1, "boom"))));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_range_covers_everything_once_in_aligned_pieces() {
        for len in [0, 1, 7, 64, 100, 577] {
            for threads in 1..5 {
                for align in [1, 4, 16] {
                    let mut next = 0;
                    for i in 0..threads {
                        let r = split_range(len, i, threads, align);
                        assert_eq!(r.start, next);
                        if r.end < len {
                            assert_eq!(r.end % align, 0);
                        }
                        next = r.end;
                    }
                    assert_eq!(next, len);
                }
            }
        }
    }
}
