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

// The event loop, the shard's state and its types are here; what the loop does
// with each kind of event is in these, one `impl Reactor` block each.
mod caller_reads;
mod channels;
mod commands;
mod completions;
mod deadlines;
mod failure;
mod host_calls;
mod responses;
mod worker_io;
mod workers;

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
    /// The queue's length as last noted (`note_queue`), counted in
    /// `Reactor::queued`.
    noted: usize,
    failures: u32,
    respawn_at: Option<Instant>,
    /// Workers are not offered before their ready byte until then: a caller
    /// claimed one whose byte was not there yet (its workers start slower than
    /// requests come, as in gVisor), which costs more than it saves.
    lazy_paused_until: Option<Instant>,
}

impl TokenState {
    /// Called after every change to the queue: publishes its length for callers'
    /// routing (`ShardSlots::queued`) and keeps `queued`, the shard's total, in step.
    fn note_queue(&mut self, index: usize, queued: &mut usize) {
        let len = self.queue.len();
        *queued = (*queued + len).saturating_sub(self.noted);
        self.noted = len;
        self.entry.per_shard[index].queued.store(len, Ordering::Relaxed);
    }

    /// Takes the oldest queued execution, if there is one, and notes the change.
    fn pop_queued(&mut self, index: usize, queued: &mut usize) -> Option<u64> {
        let id = self.queue.pop_front()?;
        self.note_queue(index, queued);
        Some(id)
    }

    /// Takes execution `id` out of the queue and notes the change.
    fn unqueue(&mut self, id: u64, index: usize, queued: &mut usize) {
        self.queue.retain(|e| *e != id);
        self.note_queue(index, queued);
    }
}

/// A batched wait's length per worker slot of the shard (see `Reactor::wait`), up
/// to `Config::batch_wait`: measured best here at 5 slots per shard (500 µs) and at
/// 25 (1 ms); at 1 slot per shard a 500 µs wait cost a third of the throughput.
const BATCH_WAIT_PER_SLOT: Duration = Duration::from_micros(100);
/// The shortest batched wait: at 1 slot per shard 100 µs woke the engine thread
/// more often than no batching did (2.6 against 1.5 wake-ups per execution).
const BATCH_WAIT_MIN: Duration = Duration::from_micros(200);

/// How long a batched wait lasts on a shard with `slots` worker slots, with
/// `Config::batch_wait` as `cap` (which wins over the floor).
fn batch_wait_for(slots: usize, cap: Duration) -> Duration {
    let slots = u32::try_from(slots).unwrap_or(u32::MAX).max(1);
    BATCH_WAIT_PER_SLOT.saturating_mul(slots).max(BATCH_WAIT_MIN).min(cap)
}

#[cfg(test)]
mod batch_wait_tests {
    use super::*;

    #[test]
    fn a_batched_wait_grows_with_the_pool_between_the_floor_and_the_cap() {
        let ms = Duration::from_millis(1);
        let us = Duration::from_micros;
        assert_eq!(batch_wait_for(0, ms), us(200), "no slots yet: the floor");
        assert_eq!(batch_wait_for(1, ms), us(200), "1 slot: the floor");
        assert_eq!(batch_wait_for(5, ms), us(500));
        assert_eq!(batch_wait_for(10, ms), ms);
        assert_eq!(batch_wait_for(50, ms), ms, "capped by Config::batch_wait");
        assert_eq!(batch_wait_for(5, us(100)), us(100), "a cap below the floor wins");
        assert_eq!(batch_wait_for(usize::MAX, Duration::MAX), BATCH_WAIT_PER_SLOT.saturating_mul(u32::MAX));
    }
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
    /// Worker slots of every code token on this shard (sizes its batched waits).
    slots: usize,
    /// Executions queued for a worker, over every code token on this shard.
    queued: usize,
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
            slots: 0,
            queued: 0,
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

    /// Submits and sleeps until completions arrive or the next timer is due. With a
    /// backlog (at least `batch_min_in_flight` executions on the shard, some of them
    /// queued for a worker) the kernel holds the wake-up until `batch_want`
    /// completions are ready or the batch wait has passed with at least one
    /// (IORING_ENTER_EXT_ARG min_wait): one wake-up per batch instead of one per
    /// completion. The pool is not keeping up then, and each wake-up saved is CPU
    /// the workers get. The wait is `BATCH_WAIT_PER_SLOT` per worker slot of the
    /// shard, from `BATCH_WAIT_MIN` up to `batch_wait`: a small pool, whose refills
    /// a long wait holds back, waits less (BENCHMARKS.md, twenty-first session).
    /// Without a backlog the timer is not armed, and one execution at a time never
    /// waits for it.
    fn wait(&mut self, wake_at: Instant) -> std::io::Result<usize> {
        // Never past `wake_at`: that is what `prepare_to_sleep` promised callers.
        let t = wake_at.saturating_duration_since(Instant::now());
        let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
        debug_assert_eq!(self.queued, self.tokens.values().map(|t| t.queue.len()).sum::<usize>(), "the shard's queued count");
        let backlog = self.execs.len() >= self.config.batch_min_in_flight && self.queued > 0;
        // The kernel ends a min_wait no earlier than its length even when the
        // timeout is nearer, so the batch ends by the next timer: a timer due within
        // the wait fires on time.
        let wait = batch_wait_for(self.slots, self.config.batch_wait).min(t);
        if self.batching && wait >= Duration::from_micros(1) && backlog {
            let us = wait.as_micros().min(u128::from(u32::MAX)) as u32;
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
