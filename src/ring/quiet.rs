//! The quiet ring: a second io_uring per shard for completions that need not wake
//! the engine thread, today the ready bytes of workers started while no execution
//! of their code token waits (a refill). The shard waits on its main ring only; it
//! collects the quiet ring's completions whenever it is awake anyway (after each
//! wake-up, before each sleep), so a ready byte costs no wake-up of its own. A
//! shard with ready bytes outstanding sleeps at most `Config::quiet_ready_within`.
//!
//! It works because of `IORING_SETUP_DEFER_TASKRUN`: a completion's task work is
//! queued on the ring and runs only when the shard enters that ring with
//! `GETEVENTS`; nothing wakes a thread that sleeps on another ring. The kernel
//! flags queued work in the submission ring's flags (`IORING_SQ_TASKRUN`, with
//! `IORING_SETUP_TASKRUN_FLAG`), so collecting costs a syscall only when there is
//! something to collect.
//!
//! When an execution does wait for a worker whose ready byte is on this ring, the
//! shard asks to be woken ([`QuietRing::set_wake`]): the ring's registered eventfd
//! is the shard's command eventfd, which the main ring reads, and the kernel
//! signals it when it queues task work on an empty list (notifications are
//! disabled through `IORING_CQ_EVENTFD_DISABLED` the rest of the time).

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};

const ENTRIES: u32 = 256;

pub(super) struct QuietRing {
    ring: IoUring,
    /// Operations submitted or waiting to be, whose completion is not collected.
    inflight: usize,
    /// Entries not yet in the submission ring.
    pending: Vec<squeue::Entry>,
    wake: bool,
}

/// One collected completion: user data, result, flags.
pub(super) type Completion = (u64, i32, u32);

impl QuietRing {
    /// A quiet ring whose wake-ups (when asked for) write `eventfd`; None where the
    /// kernel lacks what it needs (the shard then uses its main ring for all).
    pub(super) fn new(eventfd: RawFd) -> Option<QuietRing> {
        let mut builder = IoUring::builder();
        builder.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
        let ring = match builder.build(ENTRIES) {
            Ok(ring) => ring,
            Err(e) => {
                tracing::info!(error = %e, "no quiet ring: every ready byte wakes its engine thread");
                return None;
            }
        };
        if let Err(e) = ring.submitter().register_eventfd(eventfd) {
            tracing::info!(error = %e, "no quiet ring (eventfd registration): every ready byte wakes its engine thread");
            return None;
        }
        let mut ring = ring;
        ring.completion().disable_eventfd();
        Some(QuietRing { ring, inflight: 0, pending: Vec::new(), wake: false })
    }

    /// Queues `sqe`; it reaches the kernel at the next [`QuietRing::collect`].
    pub(super) fn push(&mut self, sqe: squeue::Entry) {
        self.inflight += 1;
        self.pending.push(sqe);
    }

    pub(super) fn inflight(&self) -> usize {
        self.inflight
    }

    /// Submits what is queued and appends the completions that are ready to `out`.
    /// Enters the kernel only to submit or when it flagged task work to run.
    pub(super) fn collect(&mut self, out: &mut Vec<Completion>) {
        if self.inflight == 0 {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() {
            // SAFETY: every entry points at buffers the shard keeps alive and unmoved
            // until its completion is collected (as for the main ring).
            if unsafe { self.ring.submission().push(&self.pending[i]) }.is_err() {
                self.submit();
                continue;
            }
            i += 1;
        }
        let submit = !self.pending.is_empty();
        self.pending.clear();
        if submit || self.ring.submission().taskrun() {
            self.submit();
        }
        for cqe in self.ring.completion() {
            self.inflight = self.inflight.saturating_sub(1);
            out.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %e, "quiet ring: io_uring submit failed");
            }
        }
    }

    /// Whether a completion's task work waits to be run (collect before sleeping).
    pub(super) fn has_work(&mut self) -> bool {
        self.inflight > 0 && (!self.pending.is_empty() || self.ring.submission().taskrun())
    }

    /// Asks for (or stops) a wake-up of the shard when a completion comes. After
    /// turning it on, the caller must check [`QuietRing::has_work`] before it
    /// sleeps: work queued while it was off signalled nothing.
    pub(super) fn set_wake(&mut self, on: bool) {
        if on == self.wake {
            return;
        }
        self.wake = on;
        if on {
            self.ring.completion().enable_eventfd();
        } else {
            self.ring.completion().disable_eventfd();
        }
        // The flag's store before any later load of the task-work flag.
        fence(Ordering::SeqCst);
    }

    /// Cancels every operation and collects completions until none is in flight,
    /// or until `deadline`. Returns whether none is left.
    pub(super) fn drain(&mut self, deadline: Option<Instant>) -> bool {
        if self.inflight == 0 {
            return true;
        }
        // What is ready is dropped: the shard is going away.
        self.collect(&mut Vec::new());
        if self.inflight == 0 {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(0);
        // SAFETY: a cancel entry points at nothing.
        if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
            self.submit();
        }
        loop {
            for cqe in self.ring.completion() {
                if cqe.user_data() != 0 {
                    self.inflight = self.inflight.saturating_sub(1);
                }
            }
            if self.inflight == 0 {
                return true;
            }
            let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                tracing::error!(inflight = self.inflight, "quiet ring: operations still in the kernel after the drain's deadline");
                return false;
            }
            let ts = left.map(|l| types::Timespec::new().sec(l.as_secs()).nsec(l.subsec_nanos()));
            let args = types::SubmitArgs::new();
            let waited = match &ts {
                Some(ts) => self.ring.submitter().submit_with_args(1, &args.timespec(ts)),
                None => self.ring.submitter().submit_with_args(1, &args),
            };
            if let Err(e) = waited {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) {
                    tracing::error!(error = %e, "quiet ring: io_uring_enter failed while draining");
                    return false;
                }
            }
        }
    }
}
