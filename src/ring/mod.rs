//! Thread-per-core io_uring engine. Each shard is one thread pinned to one core,
//! owning one ring, one control connection to the runner and the worker channels it
//! spawned. Other threads talk to a shard only through its command queue and its
//! eventfd; nothing on a shard blocks.

mod bufring;
mod ctl;
pub(crate) mod direct;
mod reactor;
mod ready;
mod timers;

pub(crate) use ready::{take_ready_byte, Offer, ReadyWorkers};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::completion::Sink;
use crate::{Error, Result};

/// Per code token, per shard: slots and ready workers (read by the router).
#[derive(Debug, Default)]
pub(crate) struct ShardSlots {
    pub slots: usize,
    pub idle: AtomicUsize,
    /// Executions queued on the shard for a worker of the token: stored by the
    /// shard when its queue changes, raised by a caller that routes one there.
    /// Callers route an execution with no idle worker to the shard with the
    /// fewest queued per slot, so that one shard's backlog does not wait while
    /// another's freed workers serve newer requests.
    pub queued: AtomicUsize,
    /// Ready workers a caller may claim to write its request to itself (see
    /// [`ready`]).
    pub ready: ReadyWorkers,
}

/// A loaded binary as every shard sees it.
pub(crate) struct TokenEntry {
    pub id: u64,
    pub binary: Arc<OwnedFd>,
    pub log: bool,
    /// Host API calls allowed.
    pub host_api: bool,
    /// Shared-memory region size per worker, when the token uses that transport.
    pub shm: Option<usize>,
    /// Workers are forked from a zygote template (`LoadOptions::zygote`).
    pub zygote: bool,
    /// A caller waiting for a handed-over execution may read its response from
    /// the socket itself (see [`direct`]): socket transport, no host calls, no log
    /// capture, and `Config::caller_reads`. The shard then posts no receive on
    /// an idle worker of this token that became ready with nothing in flight on
    /// the shard (`Offer::armed`).
    pub direct: bool,
    pub per_shard: Vec<ShardSlots>,
}

pub(crate) enum Cmd {
    Load(Arc<TokenEntry>),
    Execute(ExecRequest),
    Cancel(u64),
    Delete(u64),
    /// A host function finished: send its reply to the worker (if the execution is
    /// still running on it).
    HostReply { exec: u64, worker_id: u64, call_id: u64, result: crate::host_api::HostResult },
    /// Another shard saw sandbox generation `epoch` die.
    RunnerDown { epoch: u64 },
    /// The supervisor restarted the sandbox: use this control connection (and
    /// this pidfd of the new runner, see `Config::runner_channels`).
    Reconnect { epoch: u64, ctl: OwnedFd, runner: Option<Arc<OwnedFd>> },
    /// The caller that was handed execution `exec` on worker (`key`, `gen`) could
    /// write only `written` bytes of its request (`error`: why, if it failed).
    HandOverShort { exec: u64, key: u32, gen: u32, written: usize, error: Option<i32> },
    /// The caller of handed-over execution `exec` left its response to the shard
    /// (see [`direct`]): read it from the worker's socket.
    TakeOver { exec: u64 },
    /// The caller read handed-over execution `exec`'s response itself; `fd` is its
    /// reference to the worker's channel, for the shard to close.
    CallerDone { exec: u64, fd: Arc<OwnedFd> },
    /// The sandbox cannot be restarted: fail everything from now on.
    RunnerFatal(String),
    Shutdown,
    /// Tests only: the engine thread panics (see `Engine::inject_engine_panic`).
    #[cfg(feature = "fault-injection")]
    InjectPanic,
}

/// What shards tell the engine's supervisor.
pub(crate) enum SupervisorEvent {
    /// The runner connection of sandbox generation `epoch` is gone.
    RunnerDied { epoch: u64 },
    Shutdown,
}

pub(crate) struct ExecRequest {
    pub id: u64,
    pub token: u64,
    pub metadata: Arc<std::collections::HashMap<String, String>>,
    pub frame: Vec<u8>,
    pub worker_wait_timeout: Duration,
    pub timeout: Duration,
    pub sink: Sink,
    pub submitted: Instant,
    /// Set when the caller may read the response itself (see [`direct`]).
    pub handoff: Option<Arc<direct::Handoff>>,
    /// Shared-memory transport: the request is already in this claimed worker's
    /// region (`frame` is empty).
    pub claim: Option<Claim>,
}

/// A ready worker a caller claimed (see [`ShardSlots::ready`]). The caller queues
/// the execution with its claim first and then writes the request to the worker
/// itself: the shard knows the execution before the worker can answer.
pub(crate) struct Claim {
    /// The worker's shard-local key and generation.
    pub key: u32,
    pub gen: u32,
    /// Shared-memory transport: the worker's region, holding the request.
    pub region: Option<Arc<crate::ipc::shm::WorkerRegion>>,
    /// Length of the request placed in the region.
    pub len: usize,
    /// Socket transport: the length-delimited request the caller writes (the shard
    /// keeps it to write the rest if the caller's write falls short).
    pub frame: Option<Arc<Vec<u8>>>,
    /// When the caller claimed the worker.
    pub at: Instant,
    /// The caller writes the request (or rings the doorbell) itself; otherwise (a
    /// shared-memory claim with `Config::hand_over` off) the shard rings it.
    pub handed: bool,
    /// Who read the worker's ready byte (see `Offer::unconfirmed`).
    pub readiness: Readiness,
}

/// Who read a claimed worker's ready byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// The shard, before it offered the worker.
    Shard,
    /// The caller, from an unconfirmed offer.
    Caller,
    /// Nobody: the unconfirmed offer's byte was not there yet. The caller wrote
    /// nothing (the request is in the execution's `frame`); the shard waits for
    /// the byte, and runs the execution like any queued one.
    NotYet,
}

/// Engine-wide limits a shard needs.
#[derive(Clone)]
pub(crate) struct ShardConfig {
    pub index: usize,
    pub core: Option<usize>,
    pub sqpoll_idle: Option<Duration>,
    pub busy_poll: Duration,
    /// Under load (at least `batch_min_in_flight` executions on the shard) the
    /// shard waits up to this long to collect several completions per wake-up.
    pub batch_wait: Duration,
    pub batch_min_in_flight: usize,
    /// Completions that end a batched wait early.
    pub batch_want: usize,
    pub max_response_bytes: usize,
    /// See `Config::worker_start_timeout`.
    pub worker_start_timeout: Duration,
    /// See `Config::lazy_readiness`.
    pub lazy_readiness: bool,
    /// See `Config::early_dispatch`.
    pub early_dispatch: bool,
    /// See `Config::exit_report_batch` and `Config::exit_report_hold`.
    pub exit_report_batch: usize,
    pub exit_report_hold: Duration,
    pub host_api: Arc<crate::host_api::HostApi>,
    /// Where shared-memory regions come from and go back to (wiped) after use.
    pub shm_pool: Arc<crate::ipc::shm::ShmPool>,
}

pub(crate) struct ShardShared {
    queue: Mutex<CmdQueue>,
    eventfd: OwnedFd,
    /// Set by the shard when the sandbox cannot be restarted (or at shutdown).
    pub runner_dead: AtomicBool,
    /// Set when the shard's thread panicked (a bug): it takes no more work (see
    /// [`ShardShared::close`]).
    failed: AtomicBool,
    /// The shard is blocked (or about to block) in io_uring_enter.
    sleeping: AtomicBool,
    /// Worker processes this shard started whose exit it has not learnt yet.
    pub live_workers: AtomicUsize,
    /// While sleeping: when the shard wakes by itself (ns after `clock_base`).
    wakes_at: AtomicU64,
    clock_base: Instant,
    pub events: std::sync::mpsc::Sender<SupervisorEvent>,
}

/// Commands waiting for the shard, or why it takes none any more.
#[derive(Default)]
struct CmdQueue {
    cmds: Vec<Cmd>,
    /// Set once the shard's thread has failed: commands pushed after that are
    /// answered at once (see [`reject`]).
    closed: Option<Arc<str>>,
}

/// The handle other threads use to reach one shard.
pub(crate) struct ShardHandle {
    pub shared: Arc<ShardShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShardShared {
    pub(crate) fn push(&self, cmd: Cmd) {
        if let Some((cmd, why)) = self.enqueue(cmd) {
            reject(cmd, &why);
            return;
        }
        // Wake the shard only if it is (about to be) asleep: a busy shard drains the
        // queue before it waits again (see `prepare_to_sleep`).
        self.wake();
    }

    /// Queues a command the shard need not act on before `by`: it is woken only if
    /// it sleeps past that (a handed-over execution: the worker's answer wakes it,
    /// and `by` is the execution's deadline).
    pub(crate) fn push_lazy(&self, cmd: Cmd, by: Instant) {
        if let Some((cmd, why)) = self.enqueue(cmd) {
            reject(cmd, &why);
            return;
        }
        if !self.sleeping.load(Ordering::SeqCst) {
            // Awake: it drains the queue before it sleeps again.
            return;
        }
        if self.nanos(by) < self.wakes_at.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Queues a command the shard acts on whenever it next wakes; never wakes it.
    pub(crate) fn push_quiet(&self, cmd: Cmd) {
        if let Some((cmd, why)) = self.enqueue(cmd) {
            reject(cmd, &why);
        }
    }

    /// Queues `cmd`, or gives it back with the reason if the shard has failed. An
    /// execution's sink is armed here: from now on it is answered whatever happens.
    fn enqueue(&self, mut cmd: Cmd) -> Option<(Cmd, Arc<str>)> {
        if let Cmd::Execute(req) = &mut cmd {
            req.sink.arm();
        }
        let mut q = self.lock_queue();
        match &q.closed {
            Some(why) => Some((cmd, why.clone())),
            None => {
                q.cmds.push(cmd);
                None
            }
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, CmdQueue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the shard's thread has failed (it takes no more work).
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Marks the shard failed with `why`: later commands are rejected at once, and
    /// the ones already queued are returned for the caller to reject.
    fn close(&self, why: Arc<str>) -> Vec<Cmd> {
        let mut q = self.lock_queue();
        self.failed.store(true, Ordering::Release);
        q.closed = Some(why);
        std::mem::take(&mut q.cmds)
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.clock_base).as_nanos().min(u128::from(u64::MAX - 1)) as u64
    }

    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Called by the shard right before it blocks until `wakes_at` at the latest:
    /// returns false (and stays awake) if commands arrived meanwhile.
    pub(crate) fn prepare_to_sleep(&self, wakes_at: Instant) -> bool {
        self.wakes_at.store(self.nanos(wakes_at), Ordering::SeqCst);
        self.sleeping.store(true, Ordering::SeqCst);
        let empty = self.lock_queue().cmds.is_empty();
        if !empty {
            // Someone may have seen `sleeping` and written the eventfd: harmless.
            self.sleeping.store(false, Ordering::SeqCst);
        }
        empty
    }

    /// Whether commands are waiting (cheap check for busy polling).
    pub(crate) fn has_commands(&self) -> bool {
        match self.queue.try_lock() {
            Ok(q) => !q.cmds.is_empty(),
            Err(_) => true,
        }
    }

    /// Called by the shard after it woke up.
    pub(crate) fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    fn drain(&self, into: &mut Vec<Cmd>) {
        std::mem::swap(&mut self.lock_queue().cmds, into);
    }
}

/// Answers a command the failed shard `why` will never run: an execution completes
/// with `Internal` (exactly once, like every execution); the rest need no answer.
fn reject(cmd: Cmd, why: &str) {
    if let Cmd::Execute(req) = cmd {
        req.sink.complete(Err(Error::Internal(format!("the engine thread of this execution's shard failed: {why}"))));
    }
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

impl ShardHandle {
    /// Starts the shard thread; `ctl` is the host end of its runner connection,
    /// `runner` a pidfd of the runner to take worker channels from (see
    /// `Config::runner_channels`).
    pub(crate) fn start(
        config: ShardConfig,
        ctl: OwnedFd,
        runner: Option<Arc<OwnedFd>>,
        events: std::sync::mpsc::Sender<SupervisorEvent>,
    ) -> Result<ShardHandle> {
        // SAFETY: plain eventfd creation.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd owned by us.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(ShardShared {
            queue: Mutex::new(CmdQueue::default()),
            eventfd,
            runner_dead: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            live_workers: AtomicUsize::new(0),
            wakes_at: AtomicU64::new(u64::MAX),
            clock_base: Instant::now(),
            events,
        });
        let thread_shared = shared.clone();
        let name = format!("roma-ring-{}", config.index);
        // The ring is created on its own thread: with IORING_SETUP_SINGLE_ISSUER the
        // creating task is the only one allowed to submit.
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(core) = config.core {
                    pin_to_core(core);
                }
                let (ring, deferred) = match build_ring(&config) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                let _ = built_tx.send(Ok(()));
                let index = config.index;
                let mut reactor = reactor::Reactor::new(ring, deferred, config, thread_shared.clone(), ctl, runner);
                let payload = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reactor.run())) {
                    Ok(true) => return,
                    Ok(false) => {
                        // Leak everything rather than free memory the kernel may
                        // still write into.
                        std::mem::forget(reactor);
                        return;
                    }
                    Err(payload) => payload,
                };
                // A bug. Nothing may be lost: every execution this shard holds or is
                // sent from now on completes with an error, and routing skips it.
                let why: Arc<str> = Arc::from(format!("engine thread {index} panicked: {}", panic_text(&*payload)));
                tracing::error!(shard = index, error = %why, "an engine thread panicked; its executions fail and it takes no more work");
                for cmd in reactor.take_unhandled().into_iter().chain(thread_shared.close(why.clone())) {
                    reject(cmd, &why);
                }
                let abandoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reactor.abandon(&why)));
                if !matches!(abandoned, Ok(true)) {
                    // The kernel may still write into the reactor's buffers: leak them.
                    std::mem::forget(reactor);
                }
            })
            .map_err(|e| Error::io("spawn engine thread", e))?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Internal("the engine thread died while creating its io_uring".into()));
            }
        }
        Ok(ShardHandle { shared, thread: Some(thread) })
    }

    pub(crate) fn shutdown_and_join(&mut self) {
        self.shared.push(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }

    pub(crate) fn is_runner_dead(&self) -> bool {
        self.shared.runner_dead.load(Ordering::Acquire)
    }
}

/// Creates a shard's ring on the calling (shard) thread. Without SQPOLL the ring
/// defers completion work to the shard's own `io_uring_enter` calls
/// (IORING_SETUP_DEFER_TASKRUN): socket completions then neither interrupt the
/// thread nor wake it before as many completions as it asked for are ready,
/// which is what lets the wait batch them (see `ShardConfig::batch_wait`).
/// Returns the ring and whether completion work is deferred.
fn build_ring(config: &ShardConfig) -> Result<(io_uring::IoUring, bool)> {
    let fail = |e: std::io::Error| {
        Error::FailedPrecondition(format!(
            "cannot create an io_uring ({e}); check kernel.io_uring_disabled and RLIMIT_MEMLOCK"
        ))
    };
    if let Some(idle) = config.sqpoll_idle {
        let mut builder = io_uring::IoUring::builder();
        builder.setup_sqpoll(idle.as_millis().min(u32::MAX as u128) as u32);
        if let Some(core) = config.core {
            builder.setup_sqpoll_cpu(core as u32);
        }
        return builder.build(RING_ENTRIES).map(|r| (r, false)).map_err(fail);
    }
    let mut builder = io_uring::IoUring::builder();
    builder.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
    match builder.build(RING_ENTRIES) {
        Ok(ring) => Ok((ring, true)),
        // Kernels before 6.1 lack DEFER_TASKRUN.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!("io_uring without DEFER_TASKRUN (kernel before 6.1?): completions are not batched");
            io_uring::IoUring::builder().build(RING_ENTRIES).map(|r| (r, false)).map_err(fail)
        }
        Err(e) => Err(fail(e)),
    }
}

const RING_ENTRIES: u32 = 1024;

/// `from + after`, or a century from `from` when that overflows (an "unbounded"
/// timeout such as `Duration::MAX`).
pub(crate) fn deadline_after(from: Instant, after: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    from.checked_add(after.min(CENTURY)).unwrap_or(from)
}

pub(crate) fn pin_to_core(core: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity
    // reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(core, error = %std::io::Error::last_os_error(), "cannot pin engine thread");
        }
    }
}

/// Cores this process may run on, in order.
pub(crate) fn allowed_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// The cores the calling thread is pinned to (used by tests and diagnostics).
pub fn current_thread_affinity() -> Vec<usize> {
    allowed_cores()
}
