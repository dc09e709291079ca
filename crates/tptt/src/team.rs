//! A team of spinning threads for the duration of one fused decode step.
//!
//! A decode step has ~180 parallel regions (six per layer) of 10–100 µs each. Through rayon, every region from
//! the caller's thread injects a job and wakes sleeping workers (futex, scheduler), which costs
//! about as much as the region itself (measured: with 2 threads a quantized step was slower
//! than with 1). A [`Team`] instead starts `threads − 1` helpers once per step, which spin on an
//! atomic between regions, so a region costs a few atomic operations ([`with_team`]). The
//! helpers are kept between steps, parked while no team runs ([`Pool`]): a step costs a wake-up
//! instead of starting and joining threads. Kernels call [`for_each`], which uses the current
//! team when there is one and rayon otherwise; inside a team's task (two kernels run side by
//! side, one per thread) it runs inline.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

/// One published region: `n` tasks, taken by index.
struct Job<'a> {
    epoch: usize,
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    f: &'a (dyn Fn(usize) + Sync),
}

impl Job<'_> {
    /// Take and run tasks until none is left. Inside a task, regions run inline
    /// ([`for_each`]).
    fn work(&self) {
        let outer = IN_TASK.with(|t| t.replace(true));
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                break;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
        IN_TASK.with(|t| t.set(outer));
    }
}

/// State shared by the leader (the thread running the step) and its helpers.
struct Shared {
    /// The current job (a `Job` on the leader's stack), or null.
    job: AtomicPtr<Job<'static>>,
    /// Helpers between "about to read `job`" and "done with it".
    active: AtomicUsize,
    /// The last job's number: a helper runs each job once (numbers never repeat, also across
    /// the teams a pool's helpers serve).
    epoch: AtomicUsize,
    /// Ends the helpers of [`with_team`]'s own threads (the pool's park instead).
    stop: AtomicBool,
}

impl Shared {
    const fn new() -> Self {
        Self {
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }
}

/// The leader's handle.
pub struct Team<'s> {
    shared: &'s Shared,
    helpers: usize,
}

/// Helper threads kept for teams between decode steps. Starting and joining a step's helpers
/// cost ~45 µs (measured on the 2-core Xeon, about 1 % of a SmolLM2 Q4_1 step) and left the
/// first regions of every step to the leader alone; the pool's helpers park while no team runs
/// (no CPU spent between tokens or while the app waits) and are woken by the next team. One
/// team at a time uses the pool: a team started while it is taken (two sessions decoding at
/// once, or a team inside a team) starts its own helpers, as before.
struct Pool {
    shared: Shared,
    /// Taken by the leader of the team running on the pool.
    busy: AtomicBool,
    /// A team runs on the pool, with its first `wanted` helpers.
    on: AtomicBool,
    wanted: AtomicUsize,
    /// The helpers started so far, to wake.
    threads: Mutex<Vec<std::thread::Thread>>,
}

static POOL: Pool = Pool {
    shared: Shared::new(),
    busy: AtomicBool::new(false),
    on: AtomicBool::new(false),
    wanted: AtomicUsize::new(0),
    threads: Mutex::new(Vec::new()),
};

/// The pool's helper `i`: helps while a team runs that wants it, else parks.
fn pool_helper(i: usize) {
    let mut last = 0;
    loop {
        if POOL.on.load(SeqCst) && i < POOL.wanted.load(SeqCst) {
            help(&POOL.shared, &mut last);
            std::hint::spin_loop();
        } else {
            // (Woken by the next team; a wake-up that came first makes this return at once.)
            std::thread::park();
        }
    }
}

/// The pool taken for one team of `helpers` helpers; given back on drop.
struct Lease;

impl Lease {
    /// The pool with at least `helpers` started, or `None` while another team uses it (or a
    /// helper could not be started).
    fn take(helpers: usize) -> Option<Self> {
        POOL.busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .ok()?;
        // From here `Lease`'s drop gives the pool back, also on the early returns.
        let lease = Lease;
        let mut threads = POOL.threads.lock().unwrap_or_else(PoisonError::into_inner);
        while threads.len() < helpers {
            let i = threads.len();
            let spawned = std::thread::Builder::new()
                .name(format!("tptt-team-{i}"))
                .spawn(move || pool_helper(i))
                .ok()?;
            threads.push(spawned.thread().clone());
        }
        POOL.wanted.store(helpers, SeqCst);
        POOL.on.store(true, SeqCst);
        threads
            .iter()
            .take(helpers)
            .for_each(std::thread::Thread::unpark);
        Some(lease)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // No job is published any more: every region withdrew its job before returning.
        POOL.on.store(false, SeqCst);
        POOL.busy.store(false, SeqCst);
    }
}

thread_local! {
    /// The team of the step running on this thread, if any.
    static CURRENT: Cell<*const Team<'static>> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running a task of a team's region: a region inside it (a kernel
    /// called from a task, when a step runs two kernels side by side) runs inline, on this
    /// thread alone.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

impl Team<'_> {
    /// Run `f(0..n)` on the leader and the helpers; returns when all have finished.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let epoch = self.shared.epoch.fetch_add(1, SeqCst) + 1;
        let job = Job {
            epoch,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            f,
        };
        // SAFETY (lifetime): the pointer is withdrawn below, and this function waits until no
        // helper can still hold it (`active == 0` after the withdrawal), before `job` and `f`
        // go out of scope.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.shared.job.store(ptr, SeqCst);
        job.work();
        while job.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        self.shared.job.store(std::ptr::null_mut(), SeqCst);
        while self.shared.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if job.panicked.load(SeqCst) {
            panic!("a task of a parallel region panicked");
        }
    }
}

/// One look at `shared`'s job: help with it if it is new (not `last`).
fn help(shared: &Shared, last: &mut usize) {
    // Announce before reading the pointer: the leader withdraws it, then waits for 0.
    shared.active.fetch_add(1, SeqCst);
    let p = shared.job.load(SeqCst);
    if !p.is_null() {
        // SAFETY: `active` was raised before the load, so the leader keeps the job alive
        // until this helper lowers it again.
        let job = unsafe { &*p };
        if job.epoch != *last {
            *last = job.epoch;
            job.work();
        }
    }
    shared.active.fetch_sub(1, SeqCst);
}

/// The loop of [`with_team`]'s own helpers: spin, helping with each new job, until `stop`.
fn helper(shared: &Shared) {
    let mut last = 0;
    while !shared.stop.load(SeqCst) {
        help(shared, &mut last);
        std::hint::spin_loop();
    }
}

/// Run `body` with a team of `threads` (the caller plus `threads − 1` spinning helpers) as the
/// current team of this thread: the pool's helpers when it is free, else helpers started for
/// this call. With `threads ≤ 1` no thread is used.
pub fn with_team<R>(threads: usize, body: impl FnOnce() -> R) -> R {
    if threads <= 1 {
        return body();
    }
    let helpers = threads - 1;
    if let Some(lease) = Lease::take(helpers) {
        let team = Team {
            shared: &POOL.shared,
            helpers,
        };
        // (Declared after `lease`, so dropped first: the team is cleared before the pool is
        // given back, also when `body` panics.)
        let _current = Current::set(&team);
        let _lease = lease;
        return body();
    }
    let shared = Shared::new();
    std::thread::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|| helper(&shared));
        }
        let team = Team {
            shared: &shared,
            helpers,
        };
        /// Stops the helpers, also when `body` panics.
        struct Stop<'a>(&'a Shared);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.stop.store(true, SeqCst);
            }
        }
        let _stop = Stop(&shared);
        let _current = Current::set(&team);
        body()
    })
}

/// `team` as this thread's current team until dropped (also when the body panics), then the
/// one before it again.
struct Current(*const Team<'static>);

impl Current {
    fn set(team: &Team<'_>) -> Self {
        Current(CURRENT.with(|c| c.replace(std::ptr::from_ref(team).cast::<Team<'static>>())))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Threads available to a region: 1 inside a team's task, else the current team's, else
/// rayon's.
pub fn threads() -> usize {
    if IN_TASK.with(Cell::get) {
        return 1;
    }
    CURRENT.with(|c| {
        let p = c.get();
        if p.is_null() {
            rayon::current_num_threads().max(1)
        } else {
            // SAFETY: set by `with_team` for the duration of its body, on this thread only.
            unsafe { (*p).helpers + 1 }
        }
    })
}

/// `f(i)` for every `i < n`, in parallel: on the current team if there is one (see
/// [`with_team`]), else on rayon's pool; inline, in order, inside a team's task.
pub fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if IN_TASK.with(Cell::get) {
        (0..n).for_each(f);
        return;
    }
    let team = CURRENT.with(|c| c.get());
    if team.is_null() {
        (0..n).into_par_iter().for_each(f);
    } else {
        // SAFETY: as in `threads`.
        unsafe { (*team).run(n, f) };
    }
}

/// `a()` and `b()` side by side, one task each, on the current team (regions inside either run
/// inline on its thread); one after the other, on this thread, where there is no team or
/// inside a team's task.
/// `None` only if a side did not leave its result (it panicked, which the region re-raises).
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> Option<(A, B)> {
    let on_team = !IN_TASK.with(Cell::get) && CURRENT.with(|c| !c.get().is_null());
    if !on_team {
        return Some((a(), b()));
    }
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let (ra, rb) = (Mutex::new(None), Mutex::new(None));
    for_each(2, &|i| {
        if i == 0 {
            let f = a.lock().unwrap_or_else(PoisonError::into_inner).take();
            let r = f.map(|f| f());
            *ra.lock().unwrap_or_else(PoisonError::into_inner) = r;
        } else {
            let f = b.lock().unwrap_or_else(PoisonError::into_inner).take();
            let r = f.map(|f| f());
            *rb.lock().unwrap_or_else(PoisonError::into_inner) = r;
        }
    });
    let ra = ra.into_inner().unwrap_or_else(PoisonError::into_inner)?;
    let rb = rb.into_inner().unwrap_or_else(PoisonError::into_inner)?;
    Some((ra, rb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_with_and_without_a_team() {
        for t in [1, 2, 3] {
            with_team(t, || {
                for round in 0..200usize {
                    let n = round % 17;
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for_each(n, &|i| {
                        hits[i].fetch_add(1, SeqCst);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(SeqCst) == 1),
                        "threads {t}, round {round}"
                    );
                }
                if t > 1 {
                    assert_eq!(threads(), t);
                }
            });
        }
        let hits: Vec<AtomicUsize> = (0..50).map(|_| AtomicUsize::new(0)).collect();
        for_each(50, &|i| {
            hits[i].fetch_add(1, SeqCst);
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
    }

    /// A region inside a task runs inline on that task's thread (one thread for it), every
    /// inner task once, and regions after it are parallel again.
    #[test]
    fn a_region_inside_a_task_runs_inline() {
        with_team(2, || {
            let hits: Vec<AtomicUsize> = (0..4 * 9).map(|_| AtomicUsize::new(0)).collect();
            let inner_threads: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
            for_each(4, &|outer| {
                inner_threads[outer].store(threads(), SeqCst);
                let me = std::thread::current().id();
                for_each(9, &|i| {
                    assert_eq!(
                        std::thread::current().id(),
                        me,
                        "inner task {i} moved thread"
                    );
                    hits[outer * 9 + i].fetch_add(1, SeqCst);
                });
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
            assert!(inner_threads.iter().all(|t| t.load(SeqCst) == 1));
            assert_eq!(threads(), 2);
        });
    }

    /// Both sides run once and give their results, with a team, without one, and nested in a
    /// team's task; a side borrows mutably what the other does not touch.
    #[test]
    fn join_runs_both_sides_once() {
        for t in [1, 2] {
            with_team(t, || {
                let mut left = vec![0u32; 4];
                let right = AtomicUsize::new(0);
                // Without a team both sides run here, seeing what this thread sees.
                let expected = if t > 1 { 1 } else { threads() };
                let got = join(
                    || {
                        left.iter_mut().for_each(|x| *x += 1);
                        threads()
                    },
                    || right.fetch_add(1, SeqCst),
                );
                assert_eq!(got, Some((expected, 0)));
                assert_eq!(left, [1; 4]);
                assert_eq!(right.load(SeqCst), 1);
                let inner = AtomicUsize::new(0);
                for_each(3, &|_| {
                    let r = join(|| inner.fetch_add(1, SeqCst), || inner.fetch_add(1, SeqCst));
                    assert!(r.is_some());
                });
                assert_eq!(inner.load(SeqCst), 6);
            });
        }
    }

    /// Teams one after the other reuse the pool's helpers instead of starting threads: after
    /// many teams the pool holds no more helpers than the largest team of these tests asked
    /// for (two), and every task ran once, on the leader or a helper.
    #[test]
    fn teams_reuse_the_pools_helpers() {
        for round in 0..100usize {
            with_team(2 + round % 2, || {
                let hits: Vec<AtomicUsize> = (0..32).map(|_| AtomicUsize::new(0)).collect();
                for_each(32, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            });
        }
        let started = POOL.threads.lock().map(|t| t.len()).unwrap_or(usize::MAX);
        assert!((1..=2).contains(&started), "{started} pool helpers started");
        assert!(!POOL.on.load(SeqCst));
    }

    /// Teams on several threads at once (one on the pool, the others on helpers of their
    /// own) each run every task once.
    #[test]
    fn concurrent_teams_each_run_every_task_once() {
        std::thread::scope(|s| {
            for t in 0..3usize {
                s.spawn(move || {
                    for round in 0..50usize {
                        with_team(2, || {
                            let n = 5 + (round + t) % 20;
                            let hits: Vec<AtomicUsize> =
                                (0..n).map(|_| AtomicUsize::new(0)).collect();
                            for_each(n, &|i| {
                                hits[i].fetch_add(1, SeqCst);
                            });
                            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
                        });
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_team_ends() {
        let r = std::panic::catch_unwind(|| {
            with_team(2, || {
                for_each(8, &|i| {
                    if i == 5 {
                        panic!("task 5");
                    }
                })
            })
        });
        assert!(r.is_err());
        assert!(CURRENT.with(|c| c.get().is_null()));
    }
}
