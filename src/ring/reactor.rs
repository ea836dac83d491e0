//! One shard's event loop: a single io_uring drives the runner connection, every
//! worker channel (ready byte, request write, response read) and the command
//! eventfd. All state lives on this thread; every execution completes exactly once
//! because its sink is `take`n on completion.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use prost::Message;

use super::bufring::BufRing;
use super::ctl::CtlOut;
use super::direct::{self, Handoff, Peeked, Taken};
use super::timers::Timers;
use super::{Cmd, ExecRequest, Offer, Readiness, ShardConfig, ShardShared, SupervisorEvent, TokenEntry};
use crate::completion::{Logs, Metrics, RawOutcome, Sink};
use crate::ipc::control::{
    host_to_runner, runner_to_host, Channels, ChannelsTaken, Kill, Load, MakeChannels, RunnerToHost, Spawn, Unload,
};
use crate::ipc::frame::{self, Header};
use crate::ipc::fdpass;
use crate::host_api::wire::{HostCall, HostReply};
use crate::host_api::{HostCallContext, CALL_MARKER};
use crate::ipc::shm::WorkerRegion;
use crate::{CodeToken, ExecutionToken};
use crate::Error;

const K_EVENTFD: u64 = 1;
const K_CTL_RECV: u64 = 2;
const K_CTL_SEND: u64 = 3;
const K_W_RECV: u64 = 4;
const K_W_SEND: u64 = 5;
const K_W_REPLY: u64 = 6;
const K_CLOSE: u64 = 7;

/// The shard's tables keyed by its own ids (code tokens, workers, executions):
/// hashed with foldhash, not SipHash (no key comes from outside the process).
type IdMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

const RECV_CHUNK: usize = 4096;
/// Freed receive buffers a shard keeps for reuse (see `Reactor::keep_spare`).
const SPARE_BUFS: usize = 64;
/// Shared-memory responses at least this large are not copied: the caller gets them
/// straight out of the region once the worker has exited (see `ResponseBody`).
/// Smaller ones are copied out at once: a copy into heap memory the allocator
/// recycles costs about what waiting for the worker's exit does (measured: copying
/// wins at 16 MiB, breaks even at 24 MiB); above this size the copy would land in
/// freshly mapped pages (glibc maps every allocation above 32 MiB afresh), several
/// times slower than the wait.
const SHARE_RESPONSE_MIN: usize = 32 << 20;
/// Host calls one execution may have outstanding (running or reply unwritten).
const MAX_CALLS_IN_FLIGHT: u32 = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Longest sleep with no timer due (then the loop simply goes round). A caller that
/// hands an execution over without waking the shard (`ShardShared::push_lazy`)
/// wakes it only if its deadline comes before this.
const IDLE_WAKE: Duration = Duration::from_secs(1);

fn ud(kind: u64, key: u32, gen: u32) -> u64 {
    (kind << 56) | ((u64::from(gen) & 0xff_ffff) << 32) | u64::from(key)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WState {
    /// Spawn requested; waiting for the ready byte.
    Spawning,
    /// Ready, in the idle pool; a response recv is already posted, except where a
    /// caller may read the response itself (`TokenEntry::direct`, `Offer::armed`).
    /// Also a worker offered before its ready byte was read
    /// (`WorkerConn::unconfirmed`).
    Idle,
    /// Took an execution.
    Busy,
    /// Response complete or channel closed; waiting for the runner's exit report.
    Finished,
}

/// A logging worker's stdout and stderr memfds.
type LogFds = (OwnedFd, OwnedFd);
/// A shared-memory worker's region and the request length placed in it.
type ShmSlot = (Arc<WorkerRegion>, usize);

struct WorkerConn {
    worker_id: u64,
    token: u64,
    gen: u32,
    /// The host end of the channel; a caller that claimed the worker holds a clone
    /// while it writes the request.
    fd: Option<Arc<OwnedFd>>,
    state: WState,
    buf: Vec<u8>,
    filled: usize,
    /// A large response being read straight into its final buffer.
    body_buf: Option<Vec<u8>>,
    body_filled: usize,
    /// Host API replies waiting to be written, and the one being written.
    replies: VecDeque<Vec<u8>>,
    reply_inflight: Option<(Vec<u8>, usize)>,
    /// Host calls received whose reply has not been written yet.
    calls_outstanding: u32,
    inflight: u32,
    /// A receive is posted on the channel.
    armed: bool,
    exec: Option<u64>,
    exited: Option<i32>,
    logs: Option<LogFds>,
    /// Shared-memory transport: the worker's region and the request length placed
    /// in it.
    shm: Option<ShmSlot>,
    /// Why the channel failed, if it did, for the error message.
    failure: Option<String>,
    /// Killed in this state because it had closed its channel and not exited
    /// within the grace (`kill_closed`): its exit report then says whether that
    /// kill ended it, or a cause of its own before (see `on_worker_exit`).
    killed_from: Option<WState>,
    /// The runner holds a copy of this channel's host end until the worker is
    /// reaped (a runner-made channel): closing ours does not end the worker's stream.
    runner_copy: bool,
    /// Idle and offered before its ready byte was read (`Config::lazy_readiness`):
    /// no receive is posted; the caller that claims it takes the byte, or the
    /// shard does when it needs the worker itself (`take_idle`) or at its start
    /// deadline (`Timer::StartBy`).
    unconfirmed: bool,
    /// Bound to an execution while starting (`Config::early_dispatch`): its
    /// request is written, and the first byte it sends is its ready byte, which
    /// the shard has not seen yet.
    ready_pending: bool,
}

struct TokenState {
    entry: Arc<TokenEntry>,
    slots: usize,
    /// Workers spawning or idle.
    live: usize,
    idle: VecDeque<u32>,
    queue: VecDeque<u64>,
    failures: u32,
    respawn_at: Option<Instant>,
    /// Workers are not offered before their ready byte until then: a caller
    /// claimed one whose byte was not there yet (its workers start slower than
    /// requests come, as in gVisor), which costs more than it saves.
    lazy_paused_until: Option<Instant>,
}

/// How long a code token's workers are not offered unconfirmed after a caller
/// found one not started (see `TokenState::lazy_paused_until`).
const LAZY_PAUSE: Duration = Duration::from_millis(100);

struct ExecState {
    token: u64,
    frame: Vec<u8>,
    written: usize,
    sink: Option<Sink>,
    submitted: Instant,
    worker_wait_deadline: Instant,
    timeout: Duration,
    dispatched: Option<Instant>,
    sent: Option<Instant>,
    worker: Option<u32>,
    idle_left: usize,
    metadata: Arc<HashMap<String, String>>,
    /// Response body waiting for the worker's exit (logging tokens, large
    /// shared-memory responses).
    response: Option<(ResponseBody, Instant)>,
    /// Shared-memory transport: the caller already wrote the request (this many
    /// bytes) into the region of the worker it claimed, at this time.
    placed: Option<(usize, Instant)>,
    /// The caller claimed the worker at this time and writes the request (or rings
    /// the doorbell) itself: the shard posts no send unless told the write fell
    /// short (`Cmd::HandOverShort`), when it finishes it from `handed_frame`.
    handed: Option<Instant>,
    handed_frame: Option<Arc<Vec<u8>>>,
    /// The caller may read the response itself (see `direct`), and the worker's
    /// channel, to wake a reading caller when the shard takes the execution over.
    handoff: Option<(Arc<Handoff>, Option<Arc<OwnedFd>>)>,
    /// This shard reads the response from the worker (a receive was posted for it).
    engine_reads: bool,
    /// Bound to a starting worker (`Config::early_dispatch`): its timeout starts
    /// when the worker's ready byte comes in.
    written_before_ready: bool,
}

/// A complete response on its way to the caller.
enum ResponseBody {
    /// Read from the socket, or copied out of the shared-memory region.
    Buf(Vec<u8>),
    /// Still in the worker's region at `(offset, length)`. The worker could still
    /// write it, so it goes to the caller only once the worker has been reaped — then
    /// shared, not copied (the region is wiped and reused only after the caller
    /// dropped it).
    InRegion(usize, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    WorkerWait(u64),
    /// An execution's timeout, with the worker it runs on (key, generation): the
    /// timeout bounds the worker's life too, even after the execution completed.
    Deadline(u64, u32, u32),
    Respawn(u64),
    /// A worker (key, generation) must have written its ready byte by now.
    StartBy(u32, u32),
    /// A worker (key, generation) closed its channel before its request: it must
    /// have exited by now.
    ExitBy(u32, u32),
    /// The worker of a handed-over execution exited while its caller was reading
    /// the response: see whether the caller is done (see `exit_before_read`).
    CallerRead(u64),
}

/// How soon the shard looks again at an execution whose worker exited while its
/// caller was reading. The caller finishes in µs; looking then frees the worker's
/// slot without the caller having to wake the shard (a wake-up inside `wait`
/// would add its cost to every such request's latency).
const CALLER_RECHECK: Duration = Duration::from_millis(1);

/// How long a worker that closed its channel (before its request, or before its
/// response) may take to exit before it is killed. A crash closes the channel a
/// moment before the runner reports the exit, which names the cause. (Plus
/// `Config::exit_report_hold`: a clean exit's report may be held back that long.)
const EXIT_GRACE: Duration = Duration::from_millis(500);

pub(super) struct Reactor {
    ring: IoUring,
    /// Completion work runs only inside our `io_uring_enter` (DEFER_TASKRUN).
    deferred: bool,
    /// Waits under load collect completions for up to `config.batch_wait`.
    batching: bool,
    config: ShardConfig,
    shared: Arc<ShardShared>,
    ctl: OwnedFd,
    /// Sandbox generation this control connection belongs to.
    epoch: u64,
    /// Control-connection operations in the kernel (recv and send).
    ctl_inflight: u32,
    pending_reconnect: Option<(u64, OwnedFd, Option<Arc<OwnedFd>>)>,
    /// A pidfd of the runner: workers' channels are made by the runner and taken
    /// from it (`Config::runner_channels`); `None`: made here and sent along.
    runner: Option<Arc<OwnedFd>>,
    /// Channels the runner made, taken and not used yet: (id, host end).
    channel_stock: Vec<(u64, OwnedFd)>,
    /// A `MakeChannels` order is on its way: `Some(true)` if its report was
    /// asked for at once, `Some(false)` if it may wait (see `request_channels`).
    channels_requested: Option<bool>,
    /// Code tokens whose slots wait for channels.
    awaiting_channels: Vec<u64>,
    /// Set when the sandbox cannot come back: every execution fails with it.
    runner_fatal: Option<String>,
    /// The control receive's buffers: a provided-buffer ring for one multishot
    /// receive, or (where it cannot be registered) `ctl_buf` for one receive at a
    /// time.
    ctl_bufs: Option<BufRing>,
    ctl_buf: Box<[u8]>,
    ctl_decoder: frame::Decoder,
    ctl_out: CtlOut,
    runner_dead: bool,
    event_buf: Box<u64>,
    tokens: IdMap<TokenState>,
    workers: Vec<Option<WorkerConn>>,
    free: Vec<u32>,
    by_worker_id: IdMap<u32>,
    next_worker_id: u64,
    next_gen: u32,
    execs: IdMap<ExecState>,
    timers: Timers<Timer>,
    pending_sqes: Vec<squeue::Entry>,
    /// Commands being handled (reused buffer).
    cmd_buf: Vec<Cmd>,
    /// Freed workers' receive buffers, for the next ones (see `keep_spare`).
    spare_bufs: Vec<Vec<u8>>,
    /// Completions being handled (reused buffer).
    cqe_buf: Vec<cqueue::Entry>,
    /// The runner's messages being handled (reused buffer).
    msg_buf: Vec<runner_to_host::Msg>,
    /// A waiting caller was handed its result since the last loop round.
    woke_waiter: bool,
    /// Code tokens with a slot to refill.
    refills: Vec<u64>,
    /// SQEs submitted whose completion has not been reaped yet.
    in_kernel: usize,
    shutting_down: bool,
}

/// Channels asked of the runner at a time (per shard), and the stock below which
/// the next batch is asked for. Measured (BENCHMARKS.md): batches of 32 (stock up
/// to 48) cost the runner's connection threads 13-23 % more CPU, most of it in the
/// workers' clone and exec (the stock's worker ends sit in the runner's
/// descriptor table that each clone copies: the suspected cause, not confirmed);
/// batches of 2 cost more in messages and wake-ups than 4 or 8.
const CHANNEL_BATCH: u32 = 8;
const CHANNEL_LOW_WATER: usize = 3;

/// The runner connection's receive buffers: `CTL_BUF_BYTES` in all, in `CTL_BUFS`
/// provided buffers (buffer group `CTL_BGID`) when the multishot receive is used.
const CTL_BUF_BYTES: usize = 64 * 1024;
const CTL_BUFS: u16 = 8;
const CTL_BGID: u16 = 0;

/// `IORING_RECVSEND_POLL_FIRST` (include/uapi/linux/io_uring.h, Linux 5.19): a
/// recv/send flag in the SQE's `ioprio` field.
const RECVSEND_POLL_FIRST: u16 = 1;

/// Whether an operation is counted in `Reactor::in_kernel` (the drain at shutdown
/// waits for those): every one but `CLOSE`, which holds no buffer and completes
/// only when it fails (`IOSQE_CQE_SKIP_SUCCESS`).
fn counts_in_kernel(user_data: u64) -> bool {
    user_data >> 56 != K_CLOSE
}

/// What a worker killed at the exit grace before its request did (see
/// `Reactor::kill_closed`).
fn lingered_before_request() -> String {
    format!("closed its channel before its request and had not exited {} ms later", EXIT_GRACE.as_millis())
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: strsignal returns a pointer to a static or thread-local string.
        let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) }.to_string_lossy().into_owned();
        format!("was killed by signal {sig} ({name})")
    } else {
        format!("ended with wait status {status:#x}")
    }
}

impl Reactor {
    pub(super) fn new(
        ring: IoUring,
        deferred: bool,
        config: ShardConfig,
        shared: Arc<ShardShared>,
        ctl: OwnedFd,
        runner: Option<Arc<OwnedFd>>,
    ) -> Reactor {
        let min_timeout = ring.params().is_feature_min_timeout();
        let ctl_bufs = match BufRing::register(&ring, CTL_BGID, CTL_BUFS, CTL_BUF_BYTES / usize::from(CTL_BUFS)) {
            Ok(bufs) => Some(bufs),
            Err(e) => {
                tracing::info!(shard = config.index, error = %e, "no provided-buffer ring: the runner connection is read one receive at a time");
                None
            }
        };
        let ctl_bufs_missing = ctl_bufs.is_none();
        Reactor {
            batching: deferred && min_timeout && config.batch_wait > Duration::ZERO,
            deferred,
            ring,
            config,
            shared,
            ctl,
            epoch: 0,
            ctl_inflight: 0,
            pending_reconnect: None,
            runner,
            channel_stock: Vec::new(),
            channels_requested: None,
            awaiting_channels: Vec::new(),
            runner_fatal: None,
            ctl_bufs,
            ctl_buf: if ctl_bufs_missing { vec![0u8; CTL_BUF_BYTES].into_boxed_slice() } else { Box::default() },
            ctl_decoder: frame::Decoder::default(),
            ctl_out: CtlOut::default(),
            runner_dead: false,
            event_buf: Box::new(0),
            tokens: IdMap::default(),
            workers: Vec::new(),
            free: Vec::new(),
            by_worker_id: IdMap::default(),
            next_worker_id: 1,
            next_gen: 1,
            execs: IdMap::default(),
            timers: Timers::default(),
            pending_sqes: Vec::new(),
            cmd_buf: Vec::new(),
            spare_bufs: Vec::new(),
            cqe_buf: Vec::new(),
            msg_buf: Vec::new(),
            woke_waiter: false,
            refills: Vec::new(),
            in_kernel: 0,
            shutting_down: false,
        }
    }

    fn push_sqe(&mut self, sqe: squeue::Entry) {
        self.pending_sqes.push(sqe);
    }

    fn flush_sqes(&mut self) {
        if self.runner_dead {
            // Nothing more goes to a dead runner.
        } else {
            if let Some(sqe) = self.ctl_out.next_sqe(self.ctl.as_raw_fd(), ud(K_CTL_SEND, 0, 0)) {
                self.ctl_inflight += 1;
                self.pending_sqes.push(sqe);
            }
            while let Some(fd) = self.ctl_out.pop_sent_fd() {
                self.close_async(fd);
            }
        }
        let mut i = 0;
        while i < self.pending_sqes.len() {
            // SAFETY: every SQE points at buffers owned by this reactor (boxed control
            // buffers, worker buffers, execution frames) that stay alive and unmoved
            // until the matching completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&self.pending_sqes[i]) };
            if pushed.is_err() {
                if let Err(e) = self.ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
                continue;
            }
            if counts_in_kernel(self.pending_sqes[i].get_user_data()) {
                self.in_kernel += 1;
            }
            i += 1;
        }
        self.pending_sqes.clear();
    }

    /// Runs the shard until shutdown. Returns whether the kernel is done with every
    /// buffer of this reactor (otherwise the caller must leak it, not drop it).
    pub(super) fn run(&mut self) -> bool {
        self.post_eventfd_read();
        self.post_ctl_recv();
        self.request_channels(true);
        loop {
            self.drain_commands();
            if self.shutting_down {
                break;
            }
            if self.ctl_inflight == 0 {
                if let Some((epoch, ctl, runner)) = self.pending_reconnect.take() {
                    self.reconnect(epoch, ctl, runner);
                }
            }
            self.fire_timers();
            // After the timers, which may free slots too, and before any sleep.
            let mut refills = std::mem::take(&mut self.refills);
            for &token in &refills {
                self.fill_slots(token);
            }
            // The list's buffer is kept for the next round (one allocation per
            // execution otherwise), unless refilling queued more.
            refills.clear();
            if self.refills.is_empty() {
                self.refills = refills;
            }
            self.flush_sqes();
            if self.config.busy_poll > Duration::ZERO && self.has_busy_workers() {
                // A response is due soon: poll instead of sleeping (a sleep and wake-up
                // costs tens of µs in a VM).
                if let Err(e) = self.ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
                let until = Instant::now() + self.config.busy_poll;
                while self.ring.completion().is_empty()
                    && !(self.deferred && self.ring.submission().taskrun())
                    && !self.shared.has_commands()
                    && Instant::now() < until
                {
                    std::hint::spin_loop();
                }
            }
            // Computed once for the promise to callers and the wait's timeout.
            let wake_at = self.wake_time(Instant::now());
            if !self.ring.completion().is_empty() || !self.shared.prepare_to_sleep(wake_at) {
                // Work is already here: submit without waiting.
                if let Err(e) = self.ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
                self.shared.awake();
                self.reap_cqes();
                self.yield_to_woken_waiter();
                continue;
            }
            let res = self.wait(wake_at);
            self.shared.awake();
            if let Err(e) = res {
                match e.raw_os_error() {
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                    _ => {
                        tracing::error!(error = %e, "io_uring_enter failed; engine thread stops");
                        self.fail_everything("the engine thread's io_uring failed");
                        break;
                    }
                }
            }
            self.reap_cqes();
            self.yield_to_woken_waiter();
        }
        self.fail_everything("the engine is shutting down");
        self.shared.runner_dead.store(true, Ordering::Release);
        // Dropping the reactor closes the control connection: the runner kills this
        // shard's workers and exits once every shard is gone. If the drain fails the
        // caller leaks everything rather than free memory the kernel may still write
        // into.
        self.drain_kernel(None)
    }

    /// After `run` panicked (a bug): every execution this shard holds completes with
    /// `Internal`, its workers are offered no more, and the kernel is drained for at
    /// most a second. Returns whether the drain finished (the reactor may then be
    /// dropped, which closes the control connection and the workers' sockets: the
    /// workers and the runner's connection thread see end-of-file and exit).
    pub(super) fn abandon(&mut self, why: &str) -> bool {
        self.fail_all(|| Error::Internal(why.to_string()));
        self.drain_kernel(Some(Instant::now() + Duration::from_secs(1)))
    }

    /// Submits and sleeps until completions arrive or the next timer is due. Under
    /// load (`batch_min_in_flight` executions or more) the kernel holds the wake-up
    /// until `batch_want` completions are ready or `batch_wait` has passed with at
    /// least one (IORING_ENTER_EXT_ARG min_wait): one wake-up per batch instead of
    /// one per completion. In this VM the timer interrupt that ends such a wait costs
    /// about what the wake-ups it saves do (BENCHMARKS.md, nineteenth session), so
    /// under load the engine threads' CPU comes out the same either way; the timer is
    /// not armed off load. One execution at a time never waits for it.
    fn wait(&mut self, wake_at: Instant) -> std::io::Result<usize> {
        // Never past `wake_at`: that is what `prepare_to_sleep` promised callers.
        let t = wake_at.saturating_duration_since(Instant::now());
        let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
        if self.batching && self.execs.len() >= self.config.batch_min_in_flight {
            let us = self.config.batch_wait.as_micros().clamp(1, u128::from(u32::MAX)) as u32;
            let args = types::SubmitArgs::new().timespec(&ts).min_wait_usec(us);
            return self.ring.submitter().submit_with_args(self.config.batch_want, &args);
        }
        let args = types::SubmitArgs::new().timespec(&ts);
        self.ring.submitter().submit_with_args(1, &args)
    }

    /// Off load, after handing a result to a parked caller: lets the caller run
    /// before this thread's own follow-up work (the slot's refill spawn, closing the
    /// channel), when the scheduler woke the caller on this core. Without it the
    /// caller waited out that work (seen with `perf sched timehist`: the caller's
    /// scheduling delay after long engine-thread slices, ~100 µs). Costs nothing
    /// measurable when nothing else is runnable here.
    fn yield_to_woken_waiter(&mut self) {
        if std::mem::take(&mut self.woke_waiter) && self.execs.len() < self.config.batch_min_in_flight {
            // SAFETY: sched_yield takes no arguments.
            unsafe { libc::sched_yield() };
        }
    }

    /// When the shard wakes by itself if nothing happens: the next timer that can
    /// still do something, and at the latest `IDLE_WAKE` from now.
    ///
    /// Timers of executions that ended and of workers that exited are dropped
    /// first (the checks each timer's handler starts with, in `fire_timers`). Almost
    /// every timer becomes such a one (each execution leaves a timeout, each spawn a
    /// start deadline), and waiting for them ended a sleep on a timer interrupt for
    /// each: an idle shard woke hundreds of times in the timeout's length after a
    /// burst (`tests/timers.rs`), and a timer interrupt costs tens of µs of CPU in a
    /// VM (BENCHMARKS.md, nineteenth session).
    fn wake_time(&mut self, now: Instant) -> Instant {
        let Self { timers, execs, workers, .. } = self;
        // `Reactor::unexited`, on the fields borrowed apart.
        let unexited = |key: u32, gen: u32| {
            workers.get(key as usize).and_then(|w| w.as_ref()).is_some_and(|w| w.gen == gen && w.exited.is_none())
        };
        timers.drop_stale(|t| match *t {
            Timer::WorkerWait(id) | Timer::CallerRead(id) => !execs.contains_key(&id),
            Timer::Deadline(id, key, gen) => !execs.contains_key(&id) && !unexited(key, gen),
            Timer::StartBy(key, gen) | Timer::ExitBy(key, gen) => !unexited(key, gen),
            Timer::Respawn(_) => false,
        });
        let idle = now + IDLE_WAKE;
        timers.next_due().map_or(idle, |at| at.min(idle))
    }

    /// Handles every queued command. Also called before the shard acts on anything
    /// an idle worker did: a caller queues a handed-over execution before it writes
    /// the request, so after this the shard knows every execution whose request may
    /// have reached the worker. Commands not handled yet stay in `cmd_buf` (in
    /// reverse order), so that after a panic none is lost (see
    /// [`Reactor::take_unhandled`]).
    fn drain_commands(&mut self) {
        let mut cmds = std::mem::take(&mut self.cmd_buf);
        self.shared.drain(&mut cmds);
        cmds.reverse();
        self.cmd_buf = cmds;
        while let Some(cmd) = self.cmd_buf.pop() {
            self.handle_cmd(cmd);
        }
    }

    /// Commands taken from the queue but not handled (after a panic).
    pub(super) fn take_unhandled(&mut self) -> Vec<Cmd> {
        std::mem::take(&mut self.cmd_buf)
    }

    fn has_busy_workers(&self) -> bool {
        self.execs.values().any(|e| e.worker.is_some())
    }

    fn reap_cqes(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqe_buf);
        cqes.extend(self.ring.completion());
        let counted = cqes.iter().filter(|c| counts_in_kernel(c.user_data())).count();
        self.in_kernel -= counted.min(self.in_kernel);
        for cqe in cqes.drain(..) {
            self.handle_cqe(cqe.user_data(), cqe.result(), cqe.flags());
        }
        self.cqe_buf = cqes;
    }

    /// Cancels every operation still in the kernel and waits for their completions,
    /// so no buffer is freed while the kernel may still write into it.
    /// Gives up (returns false) at `deadline`, if any.
    fn drain_kernel(&mut self, deadline: Option<Instant>) -> bool {
        self.pending_sqes.clear();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(0);
        self.pending_sqes.push(cancel);
        self.flush_sqes();
        while self.in_kernel > 0 {
            let waited = match deadline {
                None => self.ring.submit_and_wait(1),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::error!(in_kernel = self.in_kernel, "operations still in the kernel after the drain's deadline");
                        return false;
                    }
                    let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
                    self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
                }
            };
            if let Err(e) = waited {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) {
                    tracing::error!(error = %e, "io_uring_enter failed while draining");
                    return false;
                }
            }
            let n = self.ring.completion().filter(|c| counts_in_kernel(c.user_data())).count();
            self.in_kernel -= n.min(self.in_kernel);
        }
        true
    }

    // ----- commands -------------------------------------------------------------

    fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Load(entry) => self.load(entry),
            Cmd::Execute(req) => self.execute(req),
            Cmd::Cancel(id) => self.cancel(id),
            Cmd::Delete(token) => self.delete(token),
            Cmd::HostReply { exec, worker_id, call_id, result } => self.on_host_reply(exec, worker_id, call_id, result),
            Cmd::HandOverShort { exec, key, gen, written, error } => self.on_hand_over_short(exec, key, gen, written, error),
            Cmd::TakeOver { exec } => self.on_take_over(exec),
            Cmd::CallerDone { exec, fd } => self.on_caller_done(exec, fd),
            Cmd::RunnerDown { epoch } => {
                if epoch == self.epoch {
                    self.runner_gone("the sandbox died");
                }
            }
            Cmd::Reconnect { epoch, ctl, runner } => self.pending_reconnect = Some((epoch, ctl, runner)),
            Cmd::RunnerFatal(why) => {
                self.runner_fatal = Some(why.clone());
                self.runner_dead = true;
                self.shared.runner_dead.store(true, Ordering::Release);
                self.fail_everything(&why);
            }
            Cmd::Shutdown => self.shutting_down = true,
            #[cfg(feature = "fault-injection")]
            Cmd::InjectPanic => panic!("injected by Engine::inject_engine_panic"),
        }
    }

    fn load(&mut self, entry: Arc<TokenEntry>) {
        let slots = entry.per_shard[self.config.index].slots;
        let id = entry.id;
        if !self.runner_dead {
            self.send_load(&entry);
        }
        self.tokens.insert(
            id,
            TokenState {
                entry,
                slots,
                live: 0,
                idle: VecDeque::new(),
                queue: VecDeque::new(),
                failures: 0,
                respawn_at: None,
                lazy_paused_until: None,
            },
        );
        self.fill_slots(id);
    }

    fn send_load(&mut self, entry: &TokenEntry) {
        match entry.binary.try_clone() {
            Ok(fd) => self.ctl_out.push(host_to_runner::Msg::Load(Load { code_id: entry.id, zygote: entry.zygote }), vec![fd]),
            Err(e) => tracing::error!(error = %e, "cannot duplicate a binary fd"),
        }
    }

    /// Starts over with a restarted sandbox: every token is loaded again and its
    /// slots filled; queued executions are served as workers become ready.
    fn reconnect(&mut self, epoch: u64, ctl: OwnedFd, runner: Option<Arc<OwnedFd>>) {
        if self.runner_fatal.is_some() {
            return;
        }
        self.ctl = ctl;
        self.epoch = epoch;
        self.ctl_out = CtlOut::default();
        self.ctl_decoder = frame::Decoder::default();
        self.runner_dead = false;
        self.post_ctl_recv();
        // Channels of the old runner lead nowhere; the new one makes a first batch
        // (queued on the fresh control queue, before the loads and spawns below).
        self.runner = runner;
        self.channel_stock.clear();
        self.channels_requested = None;
        self.request_channels(true);
        let entries: Vec<Arc<TokenEntry>> = self.tokens.values().map(|t| t.entry.clone()).collect();
        for entry in entries {
            self.send_load(&entry);
            if let Some(t) = self.tokens.get_mut(&entry.id) {
                t.failures = 0;
                t.respawn_at = None;
            }
            self.fill_slots(entry.id);
        }
        tracing::info!(shard = self.config.index, epoch, "reconnected to the restarted sandbox");
    }

    fn execute(&mut self, req: ExecRequest) {
        let ExecRequest { id, token, metadata, mut frame, worker_wait_timeout, timeout, sink, submitted, handoff, claim } = req;
        // Tests only: a bug that strikes while this thread holds the execution's sink
        // outside any table.
        #[cfg(feature = "fault-injection")]
        if metadata.get(crate::engine::FAULT_KEY).map(String::as_str) == Some("panic-in-execute") {
            panic!("injected while handling execution {id}");
        }
        if let Some(why) = &self.runner_fatal {
            answer_unqueued(sink, handoff.as_deref(), Err(Error::Unavailable(why.clone())));
            return;
        }
        if !self.tokens.contains_key(&token) {
            answer_unqueued(sink, handoff.as_deref(), Err(Error::NotFound(format!("code token code-{token} was deleted"))));
            return;
        }
        // An unconfirmed worker whose ready byte the caller did not find: the request
        // was not written; wait for the byte, and run the execution like any other.
        let claim = match claim {
            Some(c) if c.readiness == Readiness::NotYet => {
                let offered = self
                    .worker(c.key)
                    .is_some_and(|w| w.gen == c.gen && w.state == WState::Idle && w.unconfirmed && w.exec.is_none());
                if offered {
                    self.await_ready_byte(c.key);
                }
                if let Some(t) = self.tokens.get_mut(&token) {
                    t.lazy_paused_until = Some(Instant::now() + LAZY_PAUSE);
                }
                None
            }
            other => other,
        };
        let mut placed = None;
        let mut claimed_key = None;
        let mut handed = None;
        let mut handed_frame = None;
        if let Some(claim) = claim {
            let still_ready =
                self.worker(claim.key).is_some_and(|w| w.gen == claim.gen && w.state == WState::Idle && w.exec.is_none());
            if still_ready {
                if claim.readiness == Readiness::Caller {
                    self.started(claim.key);
                }
                claimed_key = Some(claim.key);
                placed = claim.region.as_ref().map(|_| (claim.len, claim.at));
                handed = claim.handed.then_some(claim.at);
                handed_frame = claim.frame;
            } else if claim.handed {
                // The worker was lost after the caller claimed it. The caller may have
                // written the request already, and the worker may have read it: never
                // run it a second time.
                answer_unqueued(
                    sink,
                    handoff.as_deref(),
                    Err(Error::Unavailable(
                        "the worker this request was handed to was lost before it answered (it crashed, was killed, or the sandbox died)".into(),
                    )),
                );
                return;
            } else {
                // A shared-memory claim the shard was to ring the doorbell for: the
                // worker never got the request. Take it back out of the region (a
                // worker still dying could scribble on it first; it is a worker of the
                // same code token, which could do no worse to the request it was meant
                // to get) and wait for another worker.
                let recovered = match &claim.region {
                    Some(region) => region.region().copy_request(claim.len),
                    None => Err(std::io::Error::other("no shared-memory region")),
                };
                match recovered {
                    Ok(body) => {
                        frame = Vec::with_capacity(body.len() + 10);
                        prost::encoding::encode_varint(body.len() as u64, &mut frame);
                        frame.extend_from_slice(&body);
                    }
                    Err(e) => {
                        sink.complete(Err(Error::Unavailable(format!(
                            "the worker claimed for this request was lost and the request cannot be recovered: {e}"
                        ))));
                        return;
                    }
                }
            }
        }
        let deadline = super::deadline_after(submitted, worker_wait_timeout);
        self.execs.insert(
            id,
            ExecState {
                token,
                frame,
                written: 0,
                sink: Some(sink),
                submitted,
                worker_wait_deadline: deadline,
                timeout,
                dispatched: None,
                sent: None,
                worker: None,
                idle_left: 0,
                metadata,
                response: None,
                placed,
                handed,
                handed_frame,
                handoff: handoff.map(|h| (h, None)),
                engine_reads: false,
                written_before_ready: false,
            },
        );
        if let Some(key) = claimed_key {
            // Out of the shard's pool (the caller already took it out of the offer).
            if let Some(t) = self.tokens.get_mut(&token) {
                t.idle.retain(|k| *k != key);
            }
            self.dispatch(id, key);
            return;
        }
        let key = self.take_idle(token);
        match key {
            Some(key) => self.dispatch(id, key),
            None => {
                if let Some(t) = self.tokens.get_mut(&token) {
                    t.queue.push_back(id);
                }
                self.timers.push(deadline, worker_wait_timeout, Timer::WorkerWait(id));
            }
        }
    }

    /// Takes a ready worker of `token` for the shard's own use: the longest-ready one
    /// no caller has claimed (a claimed one's execution is on its way here). With
    /// none whose ready byte was read, the oldest unconfirmed one is taken back
    /// and its byte taken here; if it is not there yet, the worker gets a receive
    /// for it and `None` is returned (the execution queues for it).
    fn take_idle(&mut self, token: u64) -> Option<u32> {
        let index = self.config.index;
        let t = self.tokens.get_mut(&token)?;
        let ready = &t.entry.per_shard[index].ready;
        let mut i = 0;
        while let Some(&key) = t.idle.get(i) {
            let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else {
                t.idle.remove(i);
                continue;
            };
            if w.unconfirmed {
                // Left in place unless no confirmed worker is found.
                i += 1;
                continue;
            }
            t.idle.remove(i);
            if ready.withdraw(key, w.gen) {
                return Some(key);
            }
        }
        // The oldest unconfirmed worker no caller has claimed (a claimed one leaves
        // the pool: its execution settles it).
        let taken = loop {
            let &key = t.idle.front()?;
            t.idle.pop_front();
            let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else { continue };
            if ready.withdraw(key, w.gen) {
                break (key, w.fd.clone());
            }
        };
        let (key, fd) = taken;
        if fd.is_some_and(|fd| super::take_ready_byte(&fd)) {
            self.started(key);
            return Some(key);
        }
        self.await_ready_byte(key);
        None
    }

    /// Unconfirmed worker `key`'s ready byte was taken (by a caller or, without
    /// the ring, by the shard): it has started.
    fn started(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        w.unconfirmed = false;
        let token = w.token;
        if let Some(t) = self.tokens.get_mut(&token) {
            t.failures = 0;
            t.respawn_at = None;
        }
    }

    fn cancel(&mut self, id: u64) {
        let Some(exec) = self.execs.get(&id) else { return };
        let (token, worker) = (exec.token, exec.worker);
        match worker {
            None => {
                if let Some(t) = self.tokens.get_mut(&token) {
                    t.queue.retain(|e| *e != id);
                }
            }
            Some(key) => self.kill_worker(key),
        }
        self.complete(id, Err(Error::Cancelled(format!("execution exec-{}-{id} was cancelled", self.config.index))));
    }

    fn delete(&mut self, token: u64) {
        let Some(state) = self.tokens.remove(&token) else { return };
        let msg = format!("code token code-{token} was deleted while the execution was pending");
        for id in state.queue {
            self.complete(id, Err(Error::Cancelled(msg.clone())));
        }
        let busy: Vec<u64> = self.execs.iter().filter(|(_, e)| e.token == token).map(|(id, _)| *id).collect();
        for id in busy {
            self.complete(id, Err(Error::Cancelled(msg.clone())));
        }
        if !self.runner_dead {
            self.ctl_out.push(host_to_runner::Msg::Unload(Unload { code_id: token }), Vec::new());
        }
        state.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
        state.entry.per_shard[self.config.index].ready.clear();
    }

    // ----- workers --------------------------------------------------------------

    fn fill_slots(&mut self, token: u64) {
        loop {
            let Some(t) = self.tokens.get(&token) else { return };
            if t.live >= t.slots || self.runner_dead {
                return;
            }
            if let Some(at) = t.respawn_at {
                if at > Instant::now() {
                    return;
                }
            }
            match self.spawn_worker(token) {
                Ok(true) => {}
                Ok(false) => {
                    // No channel in stock: the slot is filled when channels arrive.
                    if !self.awaiting_channels.contains(&token) {
                        self.awaiting_channels.push(token);
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot prepare a worker");
                    self.note_failure(token, &format!("cannot prepare a worker: {e}"));
                    return;
                }
            }
        }
    }

    /// Starts one worker for `token`; false when it must wait for channels from
    /// the runner (none in stock; more were asked for).
    fn spawn_worker(&mut self, token: u64) -> std::io::Result<bool> {
        let Some(t) = self.tokens.get(&token) else { return Ok(true) };
        let (log, shm_size) = (t.entry.log, t.entry.shm);
        // All but one of the shard's slots may wait for a held exit report: one
        // worker stays offered meanwhile, and a request beyond it wakes the shard,
        // which refills at once.
        let exit_batch = self.config.exit_report_batch.min(t.slots.saturating_sub(1));
        let exit_batch = if exit_batch >= 2 && !log && shm_size.is_none() { exit_batch as u32 } else { 0 };
        // The channel first, so that an empty stock costs nothing more. With a runner
        // pidfd it comes from the runner's stock (see `on_channels`); otherwise it is
        // made here and its worker end goes first with the order.
        let mut fds = Vec::new();
        let (channel, host_end) = if self.runner.is_some() {
            if self.channel_stock.len() <= CHANNEL_LOW_WATER {
                self.request_channels(false);
            }
            match self.channel_stock.pop() {
                Some((id, host)) => (id, host),
                None => {
                    self.request_channels(true);
                    return Ok(false);
                }
            }
        } else {
            let (host, runner_end) = fdpass::stream_pair()?;
            fds.push(runner_end);
            (0, host)
        };
        let (logs, shm) = match self.worker_extras(log, shm_size, &mut fds) {
            Ok(got) => got,
            Err(e) => {
                if channel != 0 {
                    // Unused: back into the stock.
                    self.channel_stock.push((channel, host_end));
                }
                return Err(e);
            }
        };
        let Some(t) = self.tokens.get_mut(&token) else { return Ok(true) };
        t.live += 1;
        let worker_id = self.next_worker_id;
        self.next_worker_id += 1;
        let shm_on = shm.is_some();
        let exit_hold_us = u32::try_from(self.config.exit_report_hold.as_micros()).unwrap_or(u32::MAX);
        let spawn = Spawn { code_id: token, worker_id, log, shm: shm_on, channel, exit_batch, exit_hold_us };
        self.ctl_out.push(host_to_runner::Msg::Spawn(spawn), fds);
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1) & 0xff_ffff;
        let conn = WorkerConn {
            worker_id,
            token,
            gen,
            fd: Some(Arc::new(host_end)),
            state: WState::Spawning,
            // Taken from `spare_bufs` when the shard first reads from it: a worker
            // whose caller reads the response never needs one.
            buf: Vec::new(),
            filled: 0,
            body_buf: None,
            body_filled: 0,
            replies: VecDeque::new(),
            reply_inflight: None,
            calls_outstanding: 0,
            inflight: 0,
            armed: false,
            exec: None,
            exited: None,
            logs,
            shm,
            failure: None,
            killed_from: None,
            runner_copy: channel != 0,
            unconfirmed: false,
            ready_pending: false,
        };
        let key = match self.free.pop() {
            Some(k) => {
                self.workers[k as usize] = Some(conn);
                k
            }
            None => {
                self.workers.push(Some(conn));
                (self.workers.len() - 1) as u32
            }
        };
        self.by_worker_id.insert(worker_id, key);
        self.shared.live_workers.fetch_add(1, Ordering::Relaxed);
        let start_by = super::deadline_after(Instant::now(), self.config.worker_start_timeout);
        self.timers.push(start_by, self.config.worker_start_timeout, Timer::StartBy(key, gen));
        let lazy = self.config.lazy_readiness
            && self.execs.is_empty()
            && self.tokens.get(&token).is_some_and(|t| {
                t.entry.direct && t.queue.is_empty() && t.lazy_paused_until.is_none_or(|u| u <= Instant::now())
            });
        // Under load: the oldest queued execution goes to this worker now (see
        // `Config::early_dispatch`).
        let early = if lazy || shm_on || !self.config.early_dispatch {
            None
        } else {
            self.tokens.get_mut(&token).and_then(|t| t.queue.pop_front())
        };
        if lazy {
            self.offer_unconfirmed(key);
        } else if let Some(exec_id) = early {
            if let Some(w) = self.worker(key) {
                w.ready_pending = true;
            }
            // The ready byte and the response come on one receive.
            self.post_worker_recv(key, RECV_CHUNK, true);
            self.dispatch(exec_id, key);
        } else {
            self.post_worker_recv(key, 1, true);
        }
        Ok(true)
    }

    /// Offers a just-spawned worker before its ready byte arrives (see
    /// `Config::lazy_readiness`): no shard wake-up for the byte.
    fn offer_unconfirmed(&mut self, key: u32) {
        let index = self.config.index;
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Idle;
        w.unconfirmed = true;
        let (token, gen, fd) = (w.token, w.gen, w.fd.clone());
        let Some(t) = self.tokens.get_mut(&token) else { return };
        t.idle.push_back(key);
        t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        if let Some(fd) = fd {
            t.entry.per_shard[index].ready.publish(Offer { key, gen, fd, region: None, armed: false, unconfirmed: true });
        }
    }

    /// Waits for the ready byte of unconfirmed worker `key`, taken out of the
    /// offers (by the shard, or by a caller that found the byte not there yet):
    /// it is a starting worker again, with a receive posted for the byte.
    fn await_ready_byte(&mut self, key: u32) {
        let index = self.config.index;
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Spawning;
        w.unconfirmed = false;
        let (token, gen) = (w.token, w.gen);
        if let Some(t) = self.tokens.get_mut(&token) {
            t.idle.retain(|k| *k != key);
            t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        }
        self.post_worker_recv(key, 1, true);
        // Its spawn's start deadline may have passed while it was offered.
        let start_by = super::deadline_after(Instant::now(), self.config.worker_start_timeout);
        self.timers.push(start_by, self.config.worker_start_timeout, Timer::StartBy(key, gen));
    }

    /// What follows a worker's channel in its spawn order, pushed onto `fds`: the
    /// log memfds (a logging token) and the shared-memory region (`shm_size`).
    fn worker_extras(
        &self,
        log: bool,
        shm_size: Option<usize>,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<(Option<LogFds>, Option<ShmSlot>)> {
        let logs = if log { Some((memfd(c"roma-stdout")?, memfd(c"roma-stderr")?)) } else { None };
        if let Some((out, err)) = &logs {
            fds.push(out.try_clone()?);
            fds.push(err.try_clone()?);
        }
        let shm = match shm_size {
            Some(size) => {
                let region = self.config.shm_pool.take(size)?;
                fds.push(region.region().fd().try_clone()?);
                Some((region, 0))
            }
            None => None,
        };
        Ok((logs, shm))
    }

    /// Asks the runner for a batch of channels unless one is on its way. Not
    /// `urgent` (the stock is low, not empty): the runner may hold the report back
    /// for up to `Config::exit_report_hold` and send it with its next message,
    /// typically a batch of exit reports, which wakes this thread anyway; in
    /// sequential traffic that spares the wake-up a report of its own cost every
    /// `CHANNEL_BATCH` executions. `urgent` with a report held back: asks for it
    /// now (a `MakeChannels` of 0 sends what waits).
    fn request_channels(&mut self, urgent: bool) {
        if self.runner.is_none() || self.runner_dead {
            return;
        }
        let count = match self.channels_requested {
            None => CHANNEL_BATCH,
            Some(false) if urgent => 0,
            Some(_) => return,
        };
        let defer_us = if urgent { 0 } else { u32::try_from(self.config.exit_report_hold.as_micros()).unwrap_or(u32::MAX) };
        self.channels_requested = Some(urgent);
        self.ctl_out.push(host_to_runner::Msg::MakeChannels(MakeChannels { count, defer_us }), Vec::new());
    }

    /// The runner made channels: take each host end from its descriptor table into
    /// the stock. The runner keeps its copy of each until the channel's worker is
    /// reaped, and so closes the socket for good: our close (`close_channel`) is
    /// then only a reference drop on this thread. Channels this shard cannot take
    /// are named unused, for the runner to close. If none could be had, this shard
    /// falls back to making channels itself.
    fn on_channels(&mut self, report: Channels) {
        self.channels_requested = None;
        let mut taken = ChannelsTaken::default();
        let mut failure = (!report.error.is_empty()).then(|| format!("the runner could not make channels: {}", report.error));
        for ch in report.channels {
            if self.runner.is_none() {
                taken.unused.push(ch.id);
                continue;
            }
            match self.take_from_runner(ch.fd) {
                Ok(fd) => self.channel_stock.push((ch.id, fd)),
                Err(e) => {
                    taken.unused.push(ch.id);
                    failure = Some(format!("cannot take a channel from the runner (pidfd_getfd): {e}"));
                }
            }
        }
        if !taken.unused.is_empty() {
            self.ctl_out.push(host_to_runner::Msg::ChannelsTaken(taken), Vec::new());
        }
        if let Some(why) = failure {
            if self.channel_stock.is_empty() && self.runner.is_some() {
                tracing::warn!(shard = self.config.index, error = %why, "worker channels are made here and sent with each spawn order from now on");
                self.runner = None;
            }
        }
        // Slots that waited for a channel.
        for token in self.awaiting_channels.drain(..) {
            if !self.refills.contains(&token) {
                self.refills.push(token);
            }
        }
    }

    /// `pidfd_getfd` of the runner's fd `fd`. What the runner reports is not trusted
    /// blindly, and this needs no check of its own: every use of a channel is a
    /// socket operation (`recv`, `send`, `shutdown`, io_uring `RECV`/`SEND`), which
    /// the kernel refuses on anything but a socket (ENOTSOCK), and that fails the
    /// channel's worker like any broken channel. (An `fstat` here cost each
    /// execution a syscall, about 3 % of the engine thread's CPU in sequential
    /// traffic, and could not tell a worker's socket from any other the runner
    /// holds.)
    fn take_from_runner(&self, fd: i32) -> std::io::Result<OwnedFd> {
        let Some(pidfd) = self.runner.as_ref() else {
            return Err(std::io::Error::other("no runner pidfd"));
        };
        // SAFETY: pidfd_getfd with a valid pidfd and no flags returns a fresh fd
        // (close-on-exec) or -1.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by us.
        Ok(unsafe { OwnedFd::from_raw_fd(got) })
    }

    fn worker(&mut self, key: u32) -> Option<&mut WorkerConn> {
        self.workers.get_mut(key as usize).and_then(|w| w.as_mut())
    }

    /// Reads up to `len` more bytes from a worker. `expect_wait`: nothing is due
    /// yet (the ready byte of a new worker, the answer to a request not sent yet),
    /// so the kernel arms the poll at once instead of first trying a read that
    /// would fail (IORING_RECVSEND_POLL_FIRST).
    fn post_worker_recv(&mut self, key: u32, len: usize, expect_wait: bool) {
        let unbuffered = self.workers.get(key as usize).and_then(|w| w.as_ref()).is_some_and(|w| w.buf.capacity() == 0);
        let spare = if unbuffered { self.spare_bufs.pop() } else { None };
        let Some(w) = self.worker(key) else { return };
        if unbuffered {
            w.buf = spare.unwrap_or_else(|| Vec::with_capacity(RECV_CHUNK));
        }
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        if w.buf.len() < w.filled + len {
            w.buf.resize(w.filled + len, 0);
        }
        // SAFETY: the range [filled, filled+len) is inside `buf`, which is not resized
        // while this recv is in flight (inflight > 0 blocks every resize path).
        let ptr = unsafe { w.buf.as_mut_ptr().add(w.filled) };
        w.inflight += 1;
        w.armed = true;
        let ioprio = if expect_wait { RECVSEND_POLL_FIRST } else { 0 };
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, len as u32).ioprio(ioprio).build().user_data(ud(K_W_RECV, key, w.gen));
        self.push_sqe(sqe);
    }

    fn post_worker_send(&mut self, key: u32, exec_id: u64) {
        let Some(exec) = self.execs.get(&exec_id) else { return };
        let ptr = exec.frame[exec.written..].as_ptr();
        let len = (exec.frame.len() - exec.written) as u32;
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        w.inflight += 1;
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_W_SEND, key, w.gen));
        self.push_sqe(sqe);
    }

    fn dispatch(&mut self, exec_id: u64, key: u32) {
        let now = Instant::now();
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Busy;
        w.exec = Some(exec_id);
        let (token, gen, armed, starting) = (w.token, w.gen, w.armed, w.ready_pending);
        let fd = w.fd.clone();
        let (idle_left, entry) = match self.tokens.get(&token) {
            Some(t) => (t.idle.len(), Some(t.entry.clone())),
            None => (0, None),
        };
        if let Some(entry) = entry {
            entry.per_shard[self.config.index].idle.store(idle_left, Ordering::Relaxed);
        }
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        exec.worker = Some(key);
        exec.idle_left = idle_left;
        if starting {
            // Its clock starts at the worker's ready byte (`ready_seen`).
            exec.written_before_ready = true;
        } else {
            // A handed-over execution's clock started when the caller claimed the
            // worker (the shard may learn of it later).
            let claimed_at = exec.handed.or(exec.placed.map(|(_, at)| at));
            exec.dispatched = Some(claimed_at.unwrap_or(now));
            let deadline = super::deadline_after(exec.dispatched.unwrap_or(now), exec.timeout);
            self.timers.push(deadline, exec.timeout, Timer::Deadline(exec_id, key, gen));
        }
        match exec.handoff.as_mut() {
            // The caller may read the answer: nothing is posted until the shard takes
            // the execution over.
            Some((_, handoff_fd)) => *handoff_fd = fd,
            None => {
                exec.engine_reads = true;
                if !armed {
                    // An idle worker of a `direct` token has no receive posted.
                    self.post_worker_recv(key, RECV_CHUNK, true);
                }
            }
        }
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        if let Some(at) = exec.handed {
            // The caller writes the request (or rings the doorbell) itself.
            exec.sent = Some(at);
            exec.written = exec.handed_frame.as_ref().map_or(0, |f| f.len());
            if let Some((len, _)) = exec.placed {
                if let Some((_, req_len)) = self.worker(key).and_then(|w| w.shm.as_mut()) {
                    *req_len = len;
                }
            }
            return;
        }
        let placed = match self.workers.get_mut(key as usize).and_then(|w| w.as_mut()).and_then(|w| w.shm.as_mut()) {
            None => None,
            Some((region, req_len)) => match exec.placed {
                Some((len, _)) => {
                    *req_len = len;
                    Some(Ok(()))
                }
                None => {
                    let body = match frame::parse_header(&exec.frame) {
                        Header::Complete { offset, .. } => &exec.frame[offset..],
                        _ => &exec.frame[..0],
                    };
                    *req_len = body.len();
                    region.note_used(crate::ipc::shm::HEADER + body.len());
                    Some(region.region().put_request(body))
                }
            },
        };
        match placed {
            None => self.post_worker_send(key, exec_id),
            Some(Ok(())) => self.post_doorbell(key),
            Some(Err(why)) => {
                self.kill_worker(key);
                self.complete(exec_id, Err(Error::InvalidArgument(why)));
            }
        }
    }

    /// Shared-memory transport: one byte on the socket says the request is in place.
    fn post_doorbell(&mut self, key: u32) {
        static DOORBELL: [u8; 1] = [0];
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        w.inflight += 1;
        let sqe = opcode::Send::new(types::Fd(fd), DOORBELL.as_ptr(), 1)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_W_SEND, key, w.gen));
        self.push_sqe(sqe);
    }

    /// The caller that was handed `exec_id` on worker (`key`, `gen`) wrote only
    /// `written` bytes: finish the write here, or (the write failed) fail the
    /// execution through the worker's exit report.
    fn on_hand_over_short(&mut self, exec_id: u64, key: u32, gen: u32, written: usize, error: Option<i32>) {
        let on_worker = self.worker(key).is_some_and(|w| w.gen == gen && w.state == WState::Busy && w.exec == Some(exec_id));
        if !on_worker {
            return;
        }
        if let Some(errno) = error {
            if let Some(w) = self.worker(key) {
                w.failure = Some(format!("request write failed: {}", std::io::Error::from_raw_os_error(errno)));
            }
            self.kill_worker(key);
            return;
        }
        let shm = self.worker(key).is_some_and(|w| w.shm.is_some());
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        exec.sent = None;
        if shm {
            self.post_doorbell(key);
            return;
        }
        let frame = exec.handed_frame.take().map(|f| Arc::try_unwrap(f).unwrap_or_else(|f| f.as_ref().clone()));
        exec.frame = frame.unwrap_or_default();
        exec.written = written.min(exec.frame.len());
        self.post_worker_send(key, exec_id);
    }

    fn kill_worker(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let worker_id = w.worker_id;
        if w.exited.is_none() && !self.runner_dead {
            self.ctl_out.push(host_to_runner::Msg::Kill(Kill { worker_id }), Vec::new());
        }
        self.close_channel(key);
    }

    /// Stops using the channel (pending ops finish with an error or EOF) and frees
    /// the worker's slot: the slot starts a fresh worker right away.
    fn close_channel(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let release = w.state != WState::Finished;
        w.state = WState::Finished;
        let token = w.token;
        // Pending ops complete promptly, and a live worker reads EOF: with a
        // runner-made channel, closing our fd alone would not tell it (the runner
        // holds a copy of this end until the worker is reaped,
        // `udf_runner::Worker::host_end`). Otherwise the close says it.
        if (w.runner_copy && w.exited.is_none()) || w.inflight > 0 {
            if let Some(fd) = w.fd.as_ref() {
                // SAFETY: shutting down a socket we own.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        if release {
            self.remove_idle(key);
            if let Some(t) = self.tokens.get_mut(&token) {
                t.live = t.live.saturating_sub(1);
            }
            // Refilled at the top of the next loop round, after a caller this round
            // completed has had the core (see `yield_to_woken_waiter`).
            if !self.refills.contains(&token) {
                self.refills.push(token);
            }
        }
        self.maybe_free(key);
    }

    fn maybe_free(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        if w.state == WState::Finished && w.inflight == 0 && w.exited.is_some() {
            let worker_id = w.worker_id;
            if let Some(fd) = w.fd.take() {
                self.close_shared(fd);
            }
            if let Some(w) = self.workers[key as usize].take() {
                self.keep_spare(w.buf);
            }
            self.by_worker_id.remove(&worker_id);
            self.free.push(key);
            self.shared.live_workers.fetch_sub(1, Ordering::Relaxed);
        } else if w.state == WState::Finished && w.inflight == 0 {
            // Close the socket now (batched into the next submit); keep the record for
            // the exit report.
            if let Some(fd) = w.fd.take() {
                self.close_shared(fd);
            }
        }
    }

    /// Keeps a freed worker's receive buffer for the next worker the shard reads
    /// from (no allocation, no free per worker), unless enough are kept or it grew
    /// large. Only buffers no operation in the kernel points into come here. It
    /// keeps a receive chunk's length, old bytes and all: nothing reads a worker's
    /// buffer past what its own receives filled (`WorkerConn::filled`), and the
    /// next receive then needs no zeroing of the chunk first (a 4 KiB `memset` per
    /// receive posted, 2 % of the engine threads' user time under load).
    fn keep_spare(&mut self, mut buf: Vec<u8>) {
        if (RECV_CHUNK..=4 * RECV_CHUNK).contains(&buf.capacity()) && self.spare_bufs.len() < SPARE_BUFS {
            if buf.len() >= RECV_CHUNK {
                buf.truncate(RECV_CHUNK);
            } else {
                buf.resize(RECV_CHUNK, 0);
            }
            self.spare_bufs.push(buf);
        }
    }

    /// Closes a worker's channel through the ring, unless a caller still holds it
    /// (then the caller's drop closes it).
    fn close_shared(&mut self, fd: Arc<OwnedFd>) {
        if let Ok(fd) = Arc::try_unwrap(fd) {
            self.close_async(fd);
        }
    }

    /// Closes an fd through the ring: no syscall of its own.
    fn close_async(&mut self, fd: OwnedFd) {
        use std::os::fd::IntoRawFd;
        // No completion unless it fails: a successful close completes inside the
        // submit, and its completion would make the next wait return at once (one
        // more loop round and `io_uring_enter`). Not counted in `in_kernel`: it
        // holds no buffer (see `counts_in_kernel`).
        let sqe = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(ud(K_CLOSE, 0, 0));
        self.push_sqe(sqe);
    }

    fn remove_idle(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let token = w.token;
        let gen = w.gen;
        if let Some(t) = self.tokens.get_mut(&token) {
            t.idle.retain(|k| *k != key);
            t.entry.per_shard[self.config.index].idle.store(t.idle.len(), Ordering::Relaxed);
            // Whether or not a caller claimed it meanwhile: its execution, when it
            // arrives, finds the worker gone (see `execute`).
            t.entry.per_shard[self.config.index].ready.withdraw(key, gen);
        }
    }

    /// A worker of `token` failed to start: respawns back off, and the oldest
    /// queued execution fails with `why`.
    fn note_failure(&mut self, token: u64, why: &str) {
        self.back_off(token);
        let victim = self.tokens.get_mut(&token).and_then(|t| t.queue.pop_front());
        if let Some(id) = victim {
            self.complete(id, Err(Error::Unavailable(why.to_string())));
        }
    }

    /// Counts a failed start of a worker of `token`: its slots are refilled only
    /// after a back-off that doubles with each failure in a row.
    fn back_off(&mut self, token: u64) {
        let Some(t) = self.tokens.get_mut(&token) else { return };
        t.failures += 1;
        let backoff = Duration::from_millis(5u64 << t.failures.min(8)).min(MAX_BACKOFF);
        let at = Instant::now() + backoff;
        t.respawn_at = Some(at);
        self.timers.push(at, backoff, Timer::Respawn(token));
    }

    // ----- completions ------------------------------------------------------------

    fn handle_cqe(&mut self, user_data: u64, res: i32, flags: u32) {
        let kind = user_data >> 56;
        let key = (user_data & 0xffff_ffff) as u32;
        let gen = ((user_data >> 32) & 0xff_ffff) as u32;
        match kind {
            K_EVENTFD => self.post_eventfd_read(),
            K_CTL_RECV => {
                // A multishot receive stays armed while its completions say `MORE`.
                let armed = cqueue::more(flags);
                if !armed {
                    self.ctl_inflight -= 1;
                }
                self.on_ctl_recv(res, cqueue::buffer_select(flags), armed);
            }
            K_CTL_SEND => {
                self.ctl_inflight -= 1;
                match self.ctl_out.on_complete(res, self.ctl.as_raw_fd(), ud(K_CTL_SEND, 0, 0)) {
                    Ok(Some(sqe)) if !self.runner_dead => {
                        self.ctl_inflight += 1;
                        self.push_sqe(sqe);
                    }
                    Ok(_) => {}
                    Err(e) => self.runner_gone(&format!("cannot send to the sandbox runner: {e}")),
                }
                while let Some(fd) = self.ctl_out.pop_sent_fd() {
                    self.close_async(fd);
                }
            }
            K_W_RECV | K_W_SEND | K_W_REPLY => {
                let valid = matches!(self.worker(key), Some(w) if w.gen == gen);
                if !valid {
                    return;
                }
                if self.worker(key).is_some_and(|w| w.state == WState::Idle) {
                    // A caller may have handed this worker a request: know it first.
                    self.drain_commands();
                }
                if let Some(w) = self.worker(key) {
                    w.inflight -= 1;
                    if kind == K_W_RECV {
                        w.armed = false;
                    }
                }
                match kind {
                    K_W_RECV => self.on_worker_recv(key, res),
                    K_W_SEND => self.on_worker_send(key, res),
                    _ => self.on_reply_sent(key, res),
                }
                self.maybe_free(key);
            }
            K_CLOSE if res < 0 => {
                tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "closing a descriptor through the ring failed");
            }
            _ => {}
        }
    }

    fn post_eventfd_read(&mut self) {
        let ptr: *mut u64 = &mut *self.event_buf;
        let sqe = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(ud(K_EVENTFD, 0, 0));
        self.push_sqe(sqe);
    }

    /// Posts the receive on the runner connection: one multishot receive into the
    /// provided-buffer ring, which stays armed across messages (no new receive and
    /// no new poll per report: about one per execution), or a single receive into
    /// `ctl_buf` without a ring.
    fn post_ctl_recv(&mut self) {
        let fd = types::Fd(self.ctl.as_raw_fd());
        let sqe = match &self.ctl_bufs {
            Some(bufs) => opcode::RecvMulti::new(fd, bufs.bgid()).build(),
            None => opcode::Recv::new(fd, self.ctl_buf.as_mut_ptr(), self.ctl_buf.len() as u32).build(),
        };
        self.ctl_inflight += 1;
        self.push_sqe(sqe.user_data(ud(K_CTL_RECV, 0, 0)));
    }

    /// A completion of the control receive: `res` bytes in provided buffer `bid`
    /// (or in `ctl_buf`); `armed`: the multishot receive goes on (otherwise it is
    /// posted again, unless the runner is gone).
    fn on_ctl_recv(&mut self, res: i32, bid: Option<u16>, armed: bool) {
        if res > 0 && !self.runner_dead {
            let n = res as usize;
            match (&self.ctl_bufs, bid) {
                (Some(bufs), Some(bid)) => self.ctl_decoder.extend(bufs.get(bid, n)),
                (None, _) => self.ctl_decoder.extend(&self.ctl_buf[..n.min(self.ctl_buf.len())]),
                (Some(_), None) => {
                    // Never from the kernel: bytes it did not say where it put.
                    self.runner_gone("a runner report arrived without its receive buffer");
                    return;
                }
            }
        }
        if let (Some(bufs), Some(bid)) = (self.ctl_bufs.as_mut(), bid) {
            bufs.recycle(bid);
        }
        if self.runner_dead {
            return;
        }
        if res <= 0 {
            // ENOBUFS: every provided buffer was in use (they are given back as
            // each completion is handled); the multishot receive ended.
            if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ENOBUFS {
                if !armed {
                    self.post_ctl_recv();
                }
                return;
            }
            self.runner_gone("the sandbox runner exited");
            return;
        }
        let mut msgs = std::mem::take(&mut self.msg_buf);
        loop {
            match self.ctl_decoder.next_frame(1 << 20) {
                Ok(Some(body)) => match RunnerToHost::decode(body) {
                    Ok(RunnerToHost { msg: Some(m) }) => msgs.push(m),
                    _ => {
                        self.runner_gone("the sandbox runner sent an undecodable control message");
                        return;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    self.runner_gone(&format!("control protocol error from the runner: {e}"));
                    return;
                }
            }
        }
        self.note_idle_exits(&msgs);
        for m in msgs.drain(..) {
            self.on_runner_msg(m);
        }
        self.msg_buf = msgs;
        if !armed && !self.runner_dead {
            self.post_ctl_recv();
        }
    }

    /// Records the exits among `msgs` of workers that are idle to the shard, then
    /// drains the commands once: a caller may have handed such a worker a request.
    /// The exits are recorded first, so that what those commands do (typically: the
    /// caller read the response, the slot is released) knows each worker is gone:
    /// no `shutdown` to tell it end-of-file, no `Kill` order, and its record is freed
    /// at once (then nothing is left for `on_worker_exit`). All of a batch's exits
    /// (`Config::exit_report_batch`) are recorded before that one drain.
    fn note_idle_exits(&mut self, msgs: &[runner_to_host::Msg]) {
        let mut any = false;
        for msg in msgs {
            if let runner_to_host::Msg::Exited(e) = msg {
                any |= self.note_exit(e.worker_id, e.wait_status);
            }
        }
        if any {
            self.drain_commands();
        }
    }

    /// Worker `worker_id` was reaped: its shared-memory region may be wiped and
    /// reused (its PID namespace is gone too). If it is idle to the shard, its exit
    /// is recorded and true returned: the commands must be drained next (see
    /// `note_idle_exits`, which calls this for every exit a report carries, before
    /// `on_runner_msg` handles it).
    fn note_exit(&mut self, worker_id: u64, status: i32) -> bool {
        let Some(&key) = self.by_worker_id.get(&worker_id) else { return false };
        let Some(w) = self.worker(key) else { return false };
        if let Some((region, _)) = w.shm.as_ref() {
            region.mark_reaped();
        }
        if w.state != WState::Idle {
            return false;
        }
        w.exited = Some(status);
        true
    }

    fn on_runner_msg(&mut self, msg: runner_to_host::Msg) {
        match msg {
            runner_to_host::Msg::Exited(e) => {
                let Some(&key) = self.by_worker_id.get(&e.worker_id) else { return };
                // `note_idle_exits` recorded this exit (and marked a shared-memory
                // region reaped) before its drain. Idle still: a caller may have
                // claimed it since; know that first.
                if self.worker(key).is_some_and(|w| w.state == WState::Idle) {
                    self.drain_commands();
                }
                if self.by_worker_id.get(&e.worker_id) == Some(&key) {
                    self.on_worker_exit(key, e.wait_status, None);
                }
            }
            runner_to_host::Msg::SpawnFailed(f) => {
                if let Some(&key) = self.by_worker_id.get(&f.worker_id) {
                    self.on_worker_exit(key, 0, Some(f.error));
                }
            }
            runner_to_host::Msg::Channels(channels) => self.on_channels(channels),
            runner_to_host::Msg::Started(_) | runner_to_host::Msg::StartFailed(_) => {}
        }
    }

    fn on_worker_exit(&mut self, key: u32, status: i32, spawn_error: Option<String>) {
        let Some(w) = self.worker(key) else { return };
        w.exited = Some(status);
        if w.state == WState::Busy && w.inflight > 0 && spawn_error.is_none() {
            // The exit report overtook the channel's last completion (response or
            // EOF): that completion finishes the execution.
            return;
        }
        if w.state == WState::Busy && spawn_error.is_none() {
            if let Some(id) = w.exec {
                if self.exit_before_read(id, key) {
                    return;
                }
            }
        }
        let Some(w) = self.worker(key) else { return };
        let (state, token, exec, failure) = (w.state, w.token, w.exec, w.failure.take());
        // Bound to its execution while starting and gone before its ready byte.
        let unstarted = w.ready_pending;
        // Killed at the grace (which left it Finished): judged as what it was then.
        let state = match w.killed_from {
            Some(from @ (WState::Spawning | WState::Idle)) => from,
            _ => state,
        };
        // Our kill at the grace ended it, not a cause of its own.
        let lingered = w.killed_from.is_some() && libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        // Built only where it is reported (not for a worker that answered and exited).
        let how = || match &spawn_error {
            Some(e) => format!("could not be started: {e}"),
            None => describe_status(status),
        };
        let killed_lingering = || format!("a worker of code-{token} {}; it was killed", lingered_before_request());
        match state {
            WState::Busy | WState::Finished if unstarted && exec.is_some() => {
                // A failed start (back-off), which costs the execution bound to the
                // worker (early dispatch), not another queued one.
                let why = if lingered {
                    killed_lingering()
                } else {
                    let detail = failure.map(|f| format!(" ({f})")).unwrap_or_default();
                    format!("a worker of code-{token} exited before signalling readiness{detail}: it {}", how())
                };
                self.back_off(token);
                if let Some(id) = exec {
                    self.complete(id, Err(Error::Unavailable(why)));
                }
                self.close_channel(key);
            }
            WState::Spawning | WState::Idle if lingered => {
                self.note_failure(token, &killed_lingering());
                self.close_channel(key);
            }
            WState::Spawning => {
                self.note_failure(token, &format!("a worker of code-{token} exited before signalling readiness: it {}", how()));
                self.close_channel(key);
            }
            WState::Idle => {
                // Offered unconfirmed: did it ever write its ready byte?
                let started = self.worker(key).is_some_and(|w| {
                    !w.unconfirmed || w.fd.as_ref().is_some_and(|fd| super::take_ready_byte(fd))
                });
                let why = if started {
                    format!("an idle worker of code-{token} exited: it {}", how())
                } else {
                    format!("a worker of code-{token} exited before signalling readiness: it {}", how())
                };
                self.note_failure(token, &why);
                self.close_channel(key);
            }
            WState::Busy | WState::Finished => {
                if let Some(id) = exec {
                    let has_response = self.execs.get(&id).is_some_and(|e| e.response.is_some());
                    if has_response {
                        self.finish_with_logs(id, key);
                    } else {
                        let detail = failure.map(|f| format!(" ({f})")).unwrap_or_default();
                        let why = if lingered {
                            format!(
                                "the UDF closed its channel before sending a complete response{detail} and had not exited {} ms later; it was killed",
                                EXIT_GRACE.as_millis()
                            )
                        } else {
                            format!("the UDF {} before sending a complete response{detail}", how())
                        };
                        self.complete(id, Err(Error::Unavailable(why)));
                    }
                }
                self.close_channel(key);
            }
        }
        self.maybe_free(key);
    }

    /// A busy worker whose response the shard has not read exited (see `direct`):
    /// true if that is handled here. The answer, if any, is still in the socket, or
    /// with the caller.
    fn exit_before_read(&mut self, id: u64, key: u32) -> bool {
        let Some(exec) = self.execs.get(&id) else { return false };
        let Some((handoff, _)) = exec.handoff.as_ref() else { return false };
        if exec.engine_reads {
            return false;
        }
        if handoff.is_done() {
            // The caller has the answer (its `CallerDone` is on the way).
            self.finish_caller_read(id);
            return true;
        }
        match handoff.engine_takes_unless_reading() {
            // The caller is reading what the worker left: it finishes (its
            // `CallerDone` wakes nobody: the shard looks again shortly, so that the
            // slot refills), or gives the execution back (`TakeOver`).
            Taken::FromCaller => {
                self.timers.push(Instant::now() + CALLER_RECHECK, CALLER_RECHECK, Timer::CallerRead(id));
                true
            }
            Taken::CallerDone => {
                self.finish_caller_read(id);
                true
            }
            // Nobody was reading, or the caller gave it back: read the socket; its
            // end of file then completes the execution with the exit status.
            Taken::Unread | Taken::Already => {
                self.start_reading(id, key);
                true
            }
        }
    }

    /// The shard reads execution `id`'s response from worker `key` from now on.
    fn start_reading(&mut self, id: u64, key: u32) {
        let Some(exec) = self.execs.get_mut(&id) else { return };
        if exec.engine_reads {
            return;
        }
        exec.engine_reads = true;
        let armed = self.worker(key).is_none_or(|w| w.armed || w.fd.is_none());
        if !armed {
            self.post_worker_recv(key, RECV_CHUNK, false);
        }
    }

    /// The caller read execution `id`'s response itself: forget it, and let the
    /// worker's slot refill.
    fn finish_caller_read(&mut self, id: u64) {
        self.finish(id, None);
    }

    /// `Cmd::TakeOver`: the caller left the response to the shard.
    fn on_take_over(&mut self, id: u64) {
        let Some(key) = self.execs.get(&id).and_then(|e| e.worker) else { return };
        let busy = self.worker(key).is_some_and(|w| w.exec == Some(id) && w.state == WState::Busy);
        if busy {
            self.start_reading(id, key);
        }
    }

    /// `Cmd::CallerDone`.
    fn on_caller_done(&mut self, id: u64, fd: Arc<OwnedFd>) {
        drop(fd);
        if self.execs.get(&id).and_then(|e| e.handoff.as_ref()).is_some_and(|(h, _)| h.is_done()) {
            self.finish_caller_read(id);
        }
    }

    /// At execution `id`'s deadline, if nobody has read its socket yet: the shard
    /// takes it over, and returns the response if one whole frame is waiting.
    fn unread_answer(&mut self, id: u64) -> Option<Vec<u8>> {
        let exec = self.execs.get(&id)?;
        if exec.engine_reads || exec.handoff.is_none() {
            return None;
        }
        if self.take_over(id) != Taken::Unread {
            return None;
        }
        let fd = self.execs.get(&id)?.handoff.as_ref()?.1.clone()?;
        match direct::peek_frame(&fd, self.config.max_response_bytes) {
            Peeked::Frame(body) => Some(body),
            Peeked::Empty | Peeked::Partial | Peeked::Other => None,
        }
    }

    /// The shard takes handed-over execution `id` over (see `engine_takes_waking`;
    /// `finish` does the same for every answer).
    fn take_over(&mut self, id: u64) -> Taken {
        match self.execs.get(&id).and_then(|e| e.handoff.as_ref()) {
            Some((handoff, fd)) => engine_takes_waking(handoff, fd.as_deref()),
            None => Taken::Already,
        }
    }

    fn on_worker_send(&mut self, key: u32, res: i32) {
        let Some(w) = self.worker(key) else { return };
        let Some(exec_id) = w.exec else { return };
        if w.state != WState::Busy {
            return;
        }
        if res < 0 {
            w.failure = Some(format!("request write failed: {}", std::io::Error::from_raw_os_error(-res)));
            return;
        }
        let (shm, starting) = (w.shm.is_some(), w.ready_pending);
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        if shm {
            exec.sent = Some(Instant::now());
            exec.frame = Vec::new();
            return;
        }
        exec.written += res as usize;
        if exec.written < exec.frame.len() {
            self.post_worker_send(key, exec_id);
        } else {
            exec.sent = Some(Instant::now());
            if !starting {
                // Kept until the ready byte otherwise (see `requeue_unstarted`).
                exec.frame = Vec::new();
            }
        }
    }

    fn on_worker_recv(&mut self, key: u32, res: i32) {
        let max = self.config.max_response_bytes;
        let Some(w) = self.worker(key) else { return };
        let state = w.state;
        if res <= 0 {
            let (w_exited, w_gen) = (w.exited, w.gen);
            if res < 0 && w.failure.is_none() && state == WState::Busy {
                w.failure = Some(format!("channel error: {}", std::io::Error::from_raw_os_error(-res)));
            } else if res == 0 && w.failure.is_none() && state == WState::Busy {
                w.failure = Some("the UDF closed its channel".into());
            }
            // EOF or error: the exit report from the runner completes the story.
            if state == WState::Idle {
                self.remove_idle(key);
            }
            if state != WState::Finished && w_exited.is_none() {
                // Unless the worker keeps running without its channel: see ExitBy.
                // A clean exit's report may be held back up to `exit_report_hold`.
                let grace = EXIT_GRACE + self.config.exit_report_hold;
                self.timers.push(Instant::now() + grace, grace, Timer::ExitBy(key, w_gen));
            }
            // The state (Spawning/Idle/Busy) stays for on_worker_exit to judge; if
            // the exit report came first, judge now.
            if let Some(status) = self.worker(key).and_then(|w| w.exited) {
                if state == WState::Busy {
                    self.on_worker_exit(key, status, None);
                }
            }
            return;
        }
        let n = res as usize;
        match state {
            WState::Spawning => {
                w.filled = 0;
                self.on_ready(key);
            }
            WState::Idle => {
                // Bytes before any request: a protocol violation.
                let token = w.token;
                tracing::warn!(token, "a UDF wrote before receiving its request; worker killed");
                self.kill_worker(key);
            }
            WState::Busy => {
                if w.body_buf.is_some() {
                    // Straight into the response buffer.
                    w.body_filled += n;
                    if w.body_filled < w.body_buf.as_ref().map_or(0, |b| b.len()) {
                        self.post_body_recv(key);
                    } else if let Some(body) = w.body_buf.take() {
                        self.on_response(key, ResponseBody::Buf(body));
                    }
                    return;
                }
                w.filled += n;
                if w.ready_pending {
                    // Its ready byte first (early dispatch), maybe with more behind.
                    w.ready_pending = false;
                    w.buf.copy_within(1..w.filled, 0);
                    w.filled -= 1;
                    let more = w.filled > 0;
                    self.ready_seen(key);
                    if !more {
                        self.post_worker_recv(key, RECV_CHUNK, false);
                        return;
                    }
                }
                self.parse_busy(key, max);
            }
            WState::Finished => {}
        }
    }

    /// The shard read worker `key`'s ready byte: it runs the oldest queued
    /// execution of its code token, or joins the idle pool and is offered.
    fn on_ready(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Idle;
        w.unconfirmed = false;
        let token = w.token;
        let (gen, fd, region) = (w.gen, w.fd.clone(), w.shm.as_ref().map(|(r, _)| r.clone()));
        // An idle worker gets its response receive now, so the answer wakes the
        // shard once, except for a `direct` token on a shard with nothing in
        // flight: there the next request is likely one a caller waits for, and
        // that caller reads the answer itself (see `direct`).
        let in_flight = !self.execs.is_empty();
        let Some(t) = self.tokens.get_mut(&token) else { return };
        let arm = !t.entry.direct || in_flight;
        t.failures = 0;
        t.respawn_at = None;
        if let Some(exec_id) = t.queue.pop_front() {
            self.post_worker_recv(key, RECV_CHUNK, true);
            self.dispatch(exec_id, key);
            return;
        }
        t.idle.push_back(key);
        t.entry.per_shard[self.config.index].idle.store(t.idle.len(), Ordering::Relaxed);
        if let Some(fd) = fd {
            t.entry.per_shard[self.config.index].ready.publish(Offer { key, gen, fd, region, armed: arm, unconfirmed: false });
        }
        if arm {
            self.post_worker_recv(key, RECV_CHUNK, true);
        }
    }

    /// The ready byte of worker `key`, bound to its execution while it started
    /// (`Config::early_dispatch`), came in: it has started, and the execution's
    /// timeout starts now, as for a request written after the byte.
    fn ready_seen(&mut self, key: u32) {
        self.started(key);
        let Some(w) = self.worker(key) else { return };
        let (gen, exec) = (w.gen, w.exec);
        let Some(id) = exec else { return };
        let Some(e) = self.execs.get_mut(&id) else { return };
        let now = Instant::now();
        e.dispatched = Some(now);
        if e.sent.is_some() {
            // Written whole: no longer needed (see `requeue_unstarted`).
            e.frame = Vec::new();
        }
        self.timers.push(super::deadline_after(now, e.timeout), e.timeout, Timer::Deadline(id, key, gen));
    }

    /// Parses what a busy worker sent: host calls (any number) and then the response
    /// frame, or on the shared-memory transport the doorbell byte.
    fn parse_busy(&mut self, key: u32, max: usize) {
        loop {
            let Some(w) = self.worker(key) else { return };
            if w.shm.is_some() && w.filled > 0 && w.buf[0] == 0 {
                if w.filled > 1 {
                    self.garbage(key, "bytes after the shared-memory doorbell".into());
                    return;
                }
                let taken = w.shm.as_ref().map(|(region, req_len)| {
                    let (off, len) = region.region().response_range(*req_len, max)?;
                    region.note_used(off + len);
                    if len >= SHARE_RESPONSE_MIN {
                        Ok(ResponseBody::InRegion(off, len))
                    } else {
                        region.region().copy_out(off, len).map(ResponseBody::Buf)
                    }
                });
                match taken {
                    Some(Ok(body)) => self.on_response(key, body),
                    Some(Err(why)) => self.garbage(key, why),
                    None => {}
                }
                return;
            }
            let (offset, len) = match frame::parse_header(&w.buf[..w.filled]) {
                Header::Incomplete => {
                    self.post_worker_recv(key, RECV_CHUNK, false);
                    return;
                }
                Header::Invalid => {
                    self.garbage(key, "invalid varint length prefix".into());
                    return;
                }
                Header::Complete { offset, len } => (offset, len),
            };
            if len == CALL_MARKER {
                let (o2, l2) = match frame::parse_header(&w.buf[offset..w.filled]) {
                    Header::Incomplete => {
                        self.post_worker_recv(key, RECV_CHUNK, false);
                        return;
                    }
                    Header::Invalid => {
                        self.garbage(key, "invalid varint length of a host call".into());
                        return;
                    }
                    Header::Complete { offset, len } => (offset, len),
                };
                if l2 > max as u64 {
                    self.garbage(key, format!("host call of {l2} bytes exceeds max_response_bytes {max}"));
                    return;
                }
                let total = offset + o2 + l2 as usize;
                if w.filled < total {
                    let missing = total - w.filled;
                    self.post_worker_recv(key, missing, false);
                    return;
                }
                let call = HostCall::decode(&w.buf[offset + o2..total]);
                w.buf.drain(..total);
                w.filled -= total;
                if w.buf.len() < RECV_CHUNK {
                    w.buf.resize(RECV_CHUNK, 0);
                }
                match call {
                    Ok(call) => self.on_host_call(key, call),
                    Err(e) => {
                        self.garbage(key, format!("undecodable host call: {e}"));
                        return;
                    }
                }
                continue;
            }
            if w.shm.is_some() {
                self.garbage(key, "a response frame on the socket with the shared-memory transport".into());
                return;
            }
            if len > max as u64 {
                self.garbage(key, format!("declared length {len} exceeds max_response_bytes {max}"));
                return;
            }
            let total = offset + len as usize;
            if w.filled > total {
                let extra = w.filled - total;
                self.garbage(key, format!("{extra} bytes after the response frame"));
            } else if w.filled == total {
                // Copied out at its size (at most a receive chunk): the chunk buffer
                // stays with the worker and goes back to `spare_bufs` with it.
                let body = w.buf[offset..total].to_vec();
                w.filled = 0;
                self.on_response(key, ResponseBody::Buf(body));
            } else {
                // Read the rest straight into a buffer of the announced size: no copy
                // of the body beyond the first chunk.
                let mut body = vec![0u8; len as usize];
                let have = w.filled - offset;
                body[..have].copy_from_slice(&w.buf[offset..w.filled]);
                w.body_filled = have;
                w.body_buf = Some(body);
                self.post_body_recv(key);
            }
            return;
        }
    }

    fn post_body_recv(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        let Some(body) = w.body_buf.as_mut() else { return };
        let remaining = body.len() - w.body_filled;
        // SAFETY: [body_filled, len) lies inside `body`, which is neither resized nor
        // dropped while this recv is in flight (inflight > 0 keeps the worker).
        let ptr = unsafe { body.as_mut_ptr().add(w.body_filled) };
        w.inflight += 1;
        w.armed = true;
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, remaining.min(u32::MAX as usize) as u32)
            .build()
            .user_data(ud(K_W_RECV, key, w.gen));
        self.push_sqe(sqe);
    }

    /// A host call arrived: run it on the host API pool; the reply comes back as a
    /// command.
    fn on_host_call(&mut self, key: u32, call: HostCall) {
        let Some(w) = self.worker(key) else { return };
        // Bound what one UDF can make the host hold: calls running plus replies
        // not yet written.
        w.calls_outstanding += 1;
        if w.calls_outstanding > MAX_CALLS_IN_FLIGHT {
            self.fail_worker(
                key,
                format!("the UDF had more than {MAX_CALLS_IN_FLIGHT} host calls in flight (replies not read); worker killed"),
            );
            return;
        }
        let (worker_id, token) = (w.worker_id, w.token);
        let Some(exec_id) = w.exec else { return };
        let allowed = self.tokens.get(&token).is_some_and(|t| t.entry.host_api);
        if !allowed {
            let reply = HostReply {
                call_id: call.call_id,
                response: Vec::new(),
                error: format!("the host API is not enabled for code token code-{token}; load it with LoadOptions::host_api"),
            };
            self.queue_reply(key, reply);
            return;
        }
        let metadata = self.execs.get(&exec_id).map(|e| e.metadata.clone()).unwrap_or_default();
        let ctx = HostCallContext {
            code_token: CodeToken(token),
            execution: ExecutionToken { shard: self.config.index as u32, id: exec_id },
            metadata,
        };
        let shared = self.shared.clone();
        let call_id = call.call_id;
        self.config.host_api.call(&call.function, ctx, call.request, move |result| {
            shared.push(Cmd::HostReply { exec: exec_id, worker_id, call_id, result });
        });
    }

    fn on_host_reply(&mut self, exec: u64, worker_id: u64, call_id: u64, result: crate::host_api::HostResult) {
        let Some(&key) = self.by_worker_id.get(&worker_id) else { return };
        let Some(w) = self.worker(key) else { return };
        if w.exec != Some(exec) || w.state != WState::Busy {
            return; // The execution ended (cancelled, timed out, ...) meanwhile.
        }
        let reply = match result {
            Ok(response) => HostReply { call_id, response, error: String::new() },
            Err(error) => HostReply { call_id, response: Vec::new(), error },
        };
        self.queue_reply(key, reply);
    }

    fn queue_reply(&mut self, key: u32, reply: HostReply) {
        let bytes = reply.encode_length_delimited_to_vec();
        let Some(w) = self.worker(key) else { return };
        w.replies.push_back(bytes);
        if w.reply_inflight.is_none() {
            self.post_next_reply(key);
        }
    }

    fn post_next_reply(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        if w.reply_inflight.is_none() {
            match w.replies.pop_front() {
                Some(b) => w.reply_inflight = Some((b, 0)),
                None => return,
            }
        }
        let Some((bytes, off)) = w.reply_inflight.as_ref() else { return };
        let (ptr, len) = (bytes[*off..].as_ptr(), (bytes.len() - off).min(u32::MAX as usize) as u32);
        w.inflight += 1;
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_W_REPLY, key, w.gen));
        self.push_sqe(sqe);
    }

    fn on_reply_sent(&mut self, key: u32, res: i32) {
        let Some(w) = self.worker(key) else { return };
        if res < 0 {
            w.failure.get_or_insert_with(|| format!("host reply write failed: {}", std::io::Error::from_raw_os_error(-res)));
            w.reply_inflight = None;
            w.replies.clear();
            return;
        }
        let done = match w.reply_inflight.as_mut() {
            Some((bytes, off)) => {
                *off += res as usize;
                *off >= bytes.len()
            }
            None => return,
        };
        if done {
            w.reply_inflight = None;
            w.calls_outstanding = w.calls_outstanding.saturating_sub(1);
        }
        if w.state == WState::Busy {
            self.post_next_reply(key);
        }
    }

    fn garbage(&mut self, key: u32, why: String) {
        self.fail_worker(key, format!("the UDF wrote a malformed response frame: {why}"));
    }

    /// Kills the worker and fails its execution with `Unavailable(message)`.
    fn fail_worker(&mut self, key: u32, message: String) {
        let exec = self.worker(key).and_then(|w| w.exec);
        self.kill_worker(key);
        if let Some(id) = exec {
            self.complete(id, Err(Error::Unavailable(message)));
        }
    }

    fn on_response(&mut self, key: u32, body: ResponseBody) {
        let Some(w) = self.worker(key) else { return };
        let Some(id) = w.exec else { return };
        let wait_for_exit = w.logs.is_some() || matches!(body, ResponseBody::InRegion(..));
        let exited = w.exited.is_some();
        let now = Instant::now();
        match body {
            ResponseBody::Buf(body) if !wait_for_exit => {
                let metrics = self.metrics(id, now);
                self.complete(id, Ok(RawOutcome { body: body.into(), logs: None, metrics }));
            }
            body => {
                if let Some(e) = self.execs.get_mut(&id) {
                    e.response = Some((body, now));
                }
                if exited {
                    self.finish_with_logs(id, key);
                }
            }
        }
        self.close_channel(key);
    }

    /// Completes an execution whose response waited for its worker's exit.
    fn finish_with_logs(&mut self, id: u64, key: u32) {
        let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else { return };
        let logs = w.logs.as_ref().map(|(out, err)| Logs { stdout: read_all(out), stderr: read_all(err) });
        let region = w.shm.as_ref().map(|(r, _)| r.clone());
        let Some((body, at)) = self.execs.get_mut(&id).and_then(|e| e.response.take()) else { return };
        let body = match (body, region) {
            (ResponseBody::Buf(b), _) => b.into(),
            (ResponseBody::InRegion(off, len), Some(region)) => match region.view(off, len) {
                Some(shared) => shared,
                // Not reaped (the deadline came first): the worker may still write
                // the region, so copy.
                None => match region.region().copy_out(off, len) {
                    Ok(b) => b.into(),
                    Err(e) => {
                        self.complete(id, Err(Error::Unavailable(e)));
                        return;
                    }
                },
            },
            (ResponseBody::InRegion(..), None) => {
                self.complete(id, Err(Error::Internal("a shared-memory response without its region".into())));
                return;
            }
        };
        let metrics = self.metrics(id, at);
        self.complete(id, Ok(RawOutcome { body, logs, metrics }));
    }

    fn metrics(&self, id: u64, done: Instant) -> Metrics {
        let Some(e) = self.execs.get(&id) else { return Metrics::default() };
        let dispatched = e.dispatched.unwrap_or(done);
        // Written before the ready byte (early dispatch): the response counts from
        // that byte.
        let sent = e.sent.unwrap_or(done).max(dispatched);
        Metrics {
            wait_for_worker: dispatched.saturating_duration_since(e.submitted),
            send: sent.saturating_duration_since(dispatched),
            response: done.saturating_duration_since(sent),
            idle_workers_left: e.idle_left,
            handed_over: e.handed.is_some(),
            read_by_caller: false,
            written_before_ready: e.written_before_ready,
        }
    }

    fn complete(&mut self, id: u64, result: crate::completion::RawResult) {
        self.finish(id, Some(result));
    }

    /// Forgets execution `id` and answers it with `result`. No answer when there is
    /// none, or when the caller read the response first (the shard takes every
    /// other execution over, see `take_over`): then it has its answer, and the
    /// worker's slot is released.
    fn finish(&mut self, id: u64, result: Option<crate::completion::RawResult>) {
        let Some(mut exec) = self.execs.remove(&id) else { return };
        let caller_has_it = match (&exec.handoff, &result) {
            (Some(_), None) => true,
            (Some((handoff, fd)), Some(_)) => engine_takes_waking(handoff, fd.as_deref()) == Taken::CallerDone,
            (None, _) => false,
        };
        let mut busy = None;
        if let Some(key) = exec.worker {
            if let Some(w) = self.worker(key) {
                if w.exec == Some(id) {
                    w.exec = None;
                    busy = (w.state == WState::Busy).then_some(key);
                }
            }
        }
        // The execution's copy of the worker's channel: closed through the ring if
        // it is the last one (no `close` syscall on this thread).
        if let Some((_, Some(fd))) = exec.handoff.take() {
            self.close_shared(fd);
        }
        match (exec.sink.take(), result) {
            (Some(sink), Some(result)) if !caller_has_it => {
                self.woke_waiter |= sink.is_channel();
                sink.complete(result);
            }
            (sink, _) => {
                if let Some(sink) = sink {
                    sink.release();
                }
                if let Some(key) = busy.filter(|_| caller_has_it) {
                    self.close_channel(key);
                }
            }
        }
    }

    // ----- timers -------------------------------------------------------------------

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::WorkerWait(id) => {
                    let Some(e) = self.execs.get(&id) else { continue };
                    if e.worker.is_some() || e.worker_wait_deadline > now {
                        continue;
                    }
                    let (token, waited) = (e.token, now.duration_since(e.submitted));
                    if let Some(t) = self.tokens.get_mut(&token) {
                        t.queue.retain(|x| *x != id);
                    }
                    self.complete(
                        id,
                        Err(Error::DeadlineExceeded(format!(
                            "no workers available for code-{token} after waiting {} ms; load more workers or raise worker_wait_timeout",
                            waited.as_millis()
                        ))),
                    );
                }
                Timer::Deadline(id, key, gen) => {
                    let Some(e) = self.execs.get(&id) else {
                        self.kill_lingering(key, gen);
                        continue;
                    };
                    let (Some(key), Some(d)) = (e.worker, e.dispatched) else { continue };
                    if d + e.timeout > now {
                        continue;
                    }
                    let timeout = e.timeout;
                    // A response waits for its worker's exit with logs or in shared
                    // memory (see `on_response`).
                    let answered = e.response.is_some();
                    if let Some(body) = self.unread_answer(id) {
                        // Answered in time, but nobody read it (the caller never waited).
                        self.kill_worker(key);
                        let metrics = self.metrics(id, now);
                        self.complete(id, Ok(RawOutcome { body: body.into(), logs: None, metrics }));
                        continue;
                    }
                    self.kill_worker(key);
                    if answered {
                        // The response was complete; only the worker's exit was late:
                        // it is delivered, with the logs written so far.
                        self.finish_with_logs(id, key);
                        continue;
                    }
                    self.complete(
                        id,
                        Err(Error::DeadlineExceeded(format!(
                            "the execution exceeded its timeout of {} ms; its worker was killed",
                            timeout.as_millis()
                        ))),
                    );
                }
                Timer::StartBy(key, gen) => {
                    if self.settle_unconfirmed(key, gen) || self.kill_unstarted_bound(key, gen) {
                        continue;
                    }
                    let timeout = self.config.worker_start_timeout;
                    self.kill_stuck(key, gen, &[WState::Spawning], || {
                        format!("did not signal readiness within {} ms", timeout.as_millis())
                    });
                }
                Timer::ExitBy(key, gen) => self.kill_closed(key, gen),
                Timer::CallerRead(id) => {
                    let Some(e) = self.execs.get(&id) else { continue };
                    let Some((handoff, _)) = e.handoff.as_ref() else { continue };
                    if handoff.is_done() {
                        self.finish_caller_read(id);
                    } else if !e.engine_reads {
                        // Still reading (or its `TakeOver` is queued): look again.
                        self.timers.push(now + CALLER_RECHECK, CALLER_RECHECK, Timer::CallerRead(id));
                    }
                }
                Timer::Respawn(token) => {
                    if let Some(t) = self.tokens.get_mut(&token) {
                        if t.respawn_at.is_some_and(|a| a <= now) {
                            t.respawn_at = None;
                        }
                    }
                    self.fill_slots(token);
                }
            }
        }
    }

    /// At its start deadline, a worker still offered unconfirmed is taken back and
    /// its ready byte looked for: there, it is ready (offered again, confirmed);
    /// not there, it is a starting worker past its deadline (false: `StartBy`
    /// kills it). True when nothing is left to do (a caller claimed it: its
    /// execution settles it; or it was ready).
    fn settle_unconfirmed(&mut self, key: u32, gen: u32) -> bool {
        let index = self.config.index;
        let Some(w) = self.unexited(key, gen) else { return false };
        if !(w.state == WState::Idle && w.unconfirmed) {
            return false;
        }
        let (token, fd) = (w.token, w.fd.clone());
        let Some(t) = self.tokens.get_mut(&token) else { return false };
        if !t.entry.per_shard[index].ready.withdraw(key, gen) {
            return true;
        }
        t.idle.retain(|k| *k != key);
        t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        if fd.is_some_and(|fd| super::take_ready_byte(&fd)) {
            self.on_ready(key);
            return true;
        }
        if let Some(w) = self.worker(key) {
            w.state = WState::Spawning;
            w.unconfirmed = false;
        }
        false
    }

    /// At its start deadline, a worker bound to its execution while starting
    /// (early dispatch) whose ready byte has not come is killed; its exit report
    /// then fails that execution and counts the failed start (see
    /// `on_worker_exit`). False if it is not such a worker.
    fn kill_unstarted_bound(&mut self, key: u32, gen: u32) -> bool {
        let timeout = self.config.worker_start_timeout;
        let Some(w) = self.unexited(key, gen) else { return false };
        if !(w.ready_pending && w.state == WState::Busy) {
            return false;
        }
        w.failure = Some(format!("it did not signal readiness within {} ms and was killed", timeout.as_millis()));
        let token = w.token;
        tracing::warn!(shard = self.config.index, token, "a worker of code-{token} did not signal readiness in time; killed");
        self.kill_worker(key);
        true
    }

    /// The worker (key, generation) if it is still the same one and not reported
    /// exited (the check every worker timer starts with).
    fn unexited(&mut self, key: u32, gen: u32) -> Option<&mut WorkerConn> {
        self.worker(key).filter(|w| w.gen == gen && w.exited.is_none())
    }

    /// The timeout of an execution that completed has passed: if its worker has
    /// still not exited (it answered, then kept running: the host closing the
    /// socket does not stop a UDF that ignores it), it is killed, so an untrusted
    /// binary cannot pile up processes beyond the pool.
    fn kill_lingering(&mut self, key: u32, gen: u32) {
        let Some(w) = self.unexited(key, gen) else { return };
        if w.exec.is_some() {
            return;
        }
        let worker = w.worker_id;
        tracing::debug!(shard = self.config.index, worker, "a worker outlived its execution's timeout; killing it");
        self.kill_worker(key);
    }

    /// A worker (key, generation) still in one of `states` and not exited can no
    /// longer serve: it is killed and counted as a start-up failure of its code
    /// token (back-off; the oldest queued execution fails with `why`, built only
    /// then: these timers fire for every worker).
    fn kill_stuck(&mut self, key: u32, gen: u32, states: &[WState], why: impl FnOnce() -> String) {
        let Some(w) = self.unexited(key, gen) else { return };
        if !states.contains(&w.state) {
            return;
        }
        let token = w.token;
        let why = why();
        tracing::warn!(shard = self.config.index, token, "a worker of code-{token} {why}; killed");
        self.note_failure(token, &format!("a worker of code-{token} {why}; it was killed"));
        self.kill_worker(key);
    }

    /// A worker (key, generation) closed its channel (or it broke) and has not
    /// been reported exited within the grace: it is killed, and what it was doing
    /// fails when the exit report comes (the runner reports the kill at once): a
    /// busy worker's execution (it can get no response: rather than at its
    /// timeout), or a starting or idle worker's start (see `on_worker_exit`). So
    /// the message names what ended the worker: on a starved machine a report may
    /// come after the grace although the UDF had died of a cause of its own (a
    /// crash) before. If no report comes, the execution's timeout or the sandbox's
    /// failure still completes it.
    fn kill_closed(&mut self, key: u32, gen: u32) {
        let Some(w) = self.unexited(key, gen) else { return };
        if !matches!(w.state, WState::Busy | WState::Spawning | WState::Idle) {
            return;
        }
        let (token, state) = (w.token, w.state);
        w.killed_from = Some(state);
        if state != WState::Busy {
            tracing::warn!(shard = self.config.index, token, "a worker of code-{token} {}; killed", lingered_before_request());
        }
        self.kill_worker(key);
    }

    // ----- failure of the whole shard ------------------------------------------

    /// The sandbox is gone: in-flight executions fail, workers are forgotten, and
    /// the supervisor is told so it can restart the sandbox. Queued executions wait
    /// (within their worker-wait timeout) for the restarted sandbox.
    fn runner_gone(&mut self, why: &str) {
        if self.runner_dead {
            return;
        }
        tracing::error!(shard = self.config.index, epoch = self.epoch, "{why}");
        self.runner_dead = true;
        // SAFETY: shutting down our own socket so pending control ops complete.
        unsafe { libc::shutdown(self.ctl.as_raw_fd(), libc::SHUT_RDWR) };
        self.requeue_unstarted();
        let msg = format!("{why}; the execution's worker was lost (the sandbox is being restarted)");
        let busy: Vec<u64> = self.execs.iter().filter(|(_, e)| e.worker.is_some()).map(|(id, _)| *id).collect();
        for id in busy {
            self.complete(id, Err(Error::Unavailable(msg.clone())));
        }
        for key in 0..self.workers.len() as u32 {
            if let Some(w) = self.worker(key) {
                w.exited.get_or_insert(0);
                w.state = WState::Finished;
                if let Some(fd) = w.fd.as_ref() {
                    // SAFETY: shutting down a socket we own.
                    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
                self.maybe_free(key);
            }
        }
        for t in self.tokens.values_mut() {
            t.live = 0;
            t.idle.clear();
            t.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
            t.entry.per_shard[self.config.index].ready.clear();
        }
        let _ = self.shared.events.send(SupervisorEvent::RunnerDied { epoch: self.epoch });
    }

    /// The sandbox died: executions written to workers that never signalled
    /// readiness (early dispatch) go back to the front of their queues, oldest
    /// first, to run in the restarted sandbox like every queued execution. Such a
    /// worker sent nothing (its first byte would have been its ready byte), so by
    /// the protocol it never read the request, and made no host call.
    fn requeue_unstarted(&mut self) {
        let mut back: Vec<(u64, u32)> = self
            .execs
            .iter()
            .filter_map(|(id, e)| {
                let key = e.worker?;
                let w = self.workers.get(key as usize)?.as_ref()?;
                (w.ready_pending && !e.frame.is_empty() && self.tokens.contains_key(&e.token)).then_some((*id, key))
            })
            .collect();
        back.sort_unstable_by_key(|&(id, _)| std::cmp::Reverse(id));
        let now = Instant::now();
        for (id, key) in back {
            if let Some(w) = self.worker(key) {
                w.exec = None;
            }
            let Some(e) = self.execs.get_mut(&id) else { continue };
            (e.worker, e.written, e.sent, e.dispatched, e.written_before_ready) = (None, 0, None, None, false);
            // Its worker wait ends when it did (a timer that fired while the
            // execution had a worker was skipped).
            let (token, wait_until) = (e.token, e.worker_wait_deadline.max(now));
            self.timers.push(wait_until, wait_until - now, Timer::WorkerWait(id));
            if let Some(t) = self.tokens.get_mut(&token) {
                t.queue.push_front(id);
            }
        }
    }

    fn fail_everything(&mut self, why: &str) {
        self.fail_all(|| Error::Unavailable(why.to_string()));
    }

    /// Completes every execution with `error()` and offers no worker any more.
    fn fail_all(&mut self, error: impl Fn() -> Error) {
        let ids: Vec<u64> = self.execs.keys().copied().collect();
        for id in ids {
            self.complete(id, Err(error()));
        }
        for t in self.tokens.values_mut() {
            t.queue.clear();
            t.idle.clear();
            t.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
            t.entry.per_shard[self.config.index].ready.clear();
        }
    }
}

/// The shard takes a handed-over execution over (`Handoff::engine_takes`); a
/// caller that was reading `fd` is woken by shutting the socket down, and then
/// takes the shard's answer.
fn engine_takes_waking(handoff: &Handoff, fd: Option<&OwnedFd>) -> Taken {
    let taken = handoff.engine_takes();
    if let (Taken::FromCaller, Some(fd)) = (taken, fd) {
        // SAFETY: shutting down a socket we hold open; the worker is being stopped
        // anyway (deadline, cancel, delete, failure).
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
    taken
}

/// Answers an execution the shard fails before it tracks it, unless its caller
/// read the worker's response first (see `direct`). A caller still reading finds
/// the worker gone (lost, or its sandbox or token going away) and takes this
/// answer.
fn answer_unqueued(sink: Sink, handoff: Option<&Handoff>, result: crate::completion::RawResult) {
    match handoff.map(Handoff::engine_takes) {
        Some(Taken::CallerDone) => sink.release(),
        _ => sink.complete(result),
    }
}

fn memfd(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; memfd_create returns a fresh fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_all(fd: &OwnedFd) -> Vec<u8> {
    let file = std::fs::File::from(match fd.try_clone() {
        Ok(f) => f,
        Err(_) => return Vec::new(),
    });
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut out[done..], done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    out.truncate(done);
    out
}
