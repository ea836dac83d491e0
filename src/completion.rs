//! Completion of one execution, exactly once, to whichever form the caller chose:
//! a runtime-agnostic future (also usable blocking through [`Execution::wait`]) or a
//! callback run on the engine thread.

use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use prost::bytes::Bytes;

use crate::ring::direct::{self, Arrivals, Handoff, Peeked};
use crate::ring::{Cmd, ShardShared};
use crate::{Error, ExecutionToken, Result};

/// Captured stdout/stderr of one execution.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Logs {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Per-execution timings measured by the engine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    /// From `execute` to a worker taking the request.
    pub wait_for_worker: Duration,
    /// Writing the request frame to the worker.
    pub send: Duration,
    /// From the request written to the complete response read.
    pub response: Duration,
    /// Ready workers of this code token left on the engine thread that took the
    /// request, right after it took one.
    pub idle_workers_left: usize,
    /// The calling thread wrote the request to a ready worker itself
    /// (`Config::hand_over`; then `send` is zero and `response` counts from the
    /// claim of the worker).
    pub handed_over: bool,
    /// The calling thread read the response from the worker itself, in
    /// `Execution::wait` (`Config::caller_reads`).
    pub read_by_caller: bool,
    /// The request was written to its worker while the worker was still starting
    /// (`Config::early_dispatch`): `wait_for_worker` ends when the engine thread
    /// saw the worker's ready byte, `send` is zero, and `response` counts from the
    /// ready byte, the timeout's start.
    pub written_before_ready: bool,
}

/// A completed execution.
#[derive(Debug)]
pub struct Response<R> {
    pub response: R,
    /// The UDF's stdout/stderr, or `FailedPrecondition` when the code token was not
    /// loaded for logging.
    pub logs: Result<Logs>,
    pub metrics: Metrics,
}

/// What the engine thread produces: the response body (no length prefix), either
/// read from the socket or shared straight out of a shared-memory region.
pub(crate) struct RawOutcome {
    pub body: Bytes,
    pub logs: Option<Logs>,
    pub metrics: Metrics,
}

pub(crate) type RawResult = Result<RawOutcome>;

/// Where a result goes. Once queued for an engine thread (`arm`), a sink that is
/// dropped without `complete` (an engine bug, such as a panic halfway through
/// handling the execution) still answers, with `Internal`: every execution
/// completes exactly once. Before that, dropping it says nothing: the submitting
/// call reports the error itself.
pub(crate) struct Sink {
    target: Option<Target>,
    armed: bool,
}

enum Target {
    Channel(oneshot::Sender<RawResult>),
    Callback(Box<dyn FnOnce(RawResult) + Send>),
}

impl Sink {
    pub(crate) fn channel(tx: oneshot::Sender<RawResult>) -> Sink {
        Sink { target: Some(Target::Channel(tx)), armed: false }
    }

    pub(crate) fn callback(f: Box<dyn FnOnce(RawResult) + Send>) -> Sink {
        Sink { target: Some(Target::Callback(f)), armed: false }
    }

    /// From now on the execution must be answered, by `complete` or by the drop.
    pub(crate) fn arm(&mut self) {
        self.armed = true;
    }

    /// Drops the sink without an answer: the caller already has its result (it read
    /// the response itself, see `ring::direct`).
    pub(crate) fn release(mut self) {
        self.armed = false;
    }

    /// A caller waits on a channel (rather than a callback).
    pub(crate) fn is_channel(&self) -> bool {
        matches!(self.target, Some(Target::Channel(_)))
    }

    pub(crate) fn complete(mut self, result: RawResult) {
        if let Some(target) = self.target.take() {
            target.complete(result);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(target) = self.target.take() {
            tracing::error!("an execution was dropped without an answer (an engine bug); it fails with Internal");
            target.complete(Err(crate::Error::Internal("the engine dropped this execution without an answer (a bug; see the log)".into())));
        }
    }
}

impl Target {
    fn complete(self, result: RawResult) {
        match self {
            // The receiver may have been dropped: the caller stopped waiting.
            Target::Channel(tx) => drop(tx.send(result)),
            Target::Callback(f) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(result))).is_err() {
                    tracing::error!("an execute callback panicked; the engine keeps running");
                }
            }
        }
    }
}

pub(crate) type Decoder<R> = fn(Bytes) -> Result<R>;

pub(crate) fn finish<R>(raw: RawResult, decode: Decoder<R>) -> Result<Response<R>> {
    let raw = raw?;
    let response = decode(raw.body)?;
    let logs = raw.logs.ok_or_else(|| {
        Error::FailedPrecondition(
            "logs are not captured for this code token: load it with log_egress or use load_for_logging".into(),
        )
    });
    Ok(Response { response, logs, metrics: raw.metrics })
}

pub(crate) fn decode_message<R: prost::Message + Default>(body: Bytes) -> Result<R> {
    // From `Bytes`, not `&[u8]`: prost then copies a `bytes` field once (into a
    // `Vec<u8>` field) or not at all (a `Bytes` field shares the body), where from a
    // slice it copies into a temporary `Bytes` first.
    R::decode(body).map_err(|e| {
        Error::Unavailable(format!(
            "the UDF's response does not decode as {}: {e}",
            std::any::type_name::<R>()
        ))
    })
}

pub(crate) fn decode_raw(body: Bytes) -> Result<Vec<u8>> {
    // No copy when the body is a plain buffer read from the socket.
    Ok(Vec::from(body))
}

/// A handed-over execution whose response the calling thread may read from the
/// worker's socket itself, in `Execution::wait` (see `ring::direct`).
pub(crate) struct DirectRead {
    pub exec: u64,
    pub handoff: Arc<Handoff>,
    /// The worker's channel (host end).
    pub fd: Arc<OwnedFd>,
    pub shard: Arc<ShardShared>,
    pub max_response_bytes: usize,
    /// The execution's deadline (the shard enforces it; see `read`).
    pub deadline: Instant,
    pub submitted: Instant,
    /// When the caller claimed the worker.
    pub claimed: Instant,
    pub idle_left: usize,
}

/// How long past the deadline a caller reading the socket waits for the shard to
/// take the execution over. The shard shuts the socket down when it does, which
/// wakes the caller at once; this only bounds the wait if it never does (its
/// thread failed, a bug: the answer then comes through the channel).
const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

impl DirectRead {
    /// Reads the response on this thread. `None`: the engine thread answers,
    /// through the execution's channel (the shard took it over, or the caller left
    /// it: anything but one whole frame, which is left unread for the shard).
    fn read(self, spin: Duration) -> Option<RawOutcome> {
        if !self.handoff.caller_claims() {
            return None;
        }
        let start = Instant::now();
        // Parking at once (the worker shares this core, and has not run since the
        // request was written): wait before the first look, which would find nothing.
        if spin.is_zero() && !direct::wait_readable(&self.fd, self.deadline.saturating_duration_since(start) + DEADLINE_MARGIN) {
            self.leave_to_engine();
            return None;
        }
        // Set once part of a frame is there: waits for the rest.
        let mut arrivals: Option<Arrivals> = None;
        loop {
            let peeked = direct::peek_frame(&self.fd, self.max_response_bytes);
            match peeked {
                Peeked::Frame(body) => {
                    drop(arrivals);
                    if !self.handoff.caller_finishes() {
                        return None;
                    }
                    let done = Instant::now();
                    let metrics = Metrics {
                        wait_for_worker: self.claimed.saturating_duration_since(self.submitted),
                        send: Duration::ZERO,
                        response: done.saturating_duration_since(self.claimed),
                        idle_workers_left: self.idle_left,
                        handed_over: true,
                        read_by_caller: true,
                        written_before_ready: false,
                    };
                    // The shard forgets the execution and closes the channel when it
                    // next wakes: no wake-up for it now.
                    let DirectRead { exec, fd, shard, .. } = self;
                    shard.push_quiet(Cmd::CallerDone { exec, fd });
                    return Some(RawOutcome { body: body.into(), logs: None, metrics });
                }
                Peeked::Other => break,
                Peeked::Empty if start.elapsed() < spin => std::hint::spin_loop(),
                Peeked::Empty | Peeked::Partial => {
                    let left = self.deadline.saturating_duration_since(Instant::now()) + DEADLINE_MARGIN;
                    let more = match (&arrivals, peeked) {
                        (Some(a), _) => a.wait(left),
                        (None, Peeked::Partial) => match Arrivals::watch(self.fd.clone()) {
                            Ok(a) => {
                                arrivals = Some(a);
                                continue;
                            }
                            Err(_) => break,
                        },
                        (None, _) => direct::wait_readable(&self.fd, left),
                    };
                    if !more {
                        break;
                    }
                }
            }
        }
        drop(arrivals);
        self.leave_to_engine();
        None
    }

    /// The engine thread reads the response (unless it took the execution already).
    fn leave_to_engine(&self) {
        if self.handoff.give_back() {
            self.shard.push(Cmd::TakeOver { exec: self.exec });
        }
    }
}

/// A pending execution: a future of its [`Response`], runtime-agnostic.
#[must_use = "an execution's result is only observed through its future"]
pub struct Execution<R> {
    token: ExecutionToken,
    rx: oneshot::Receiver<RawResult>,
    decode: Decoder<R>,
    /// How long `wait` polls before parking.
    spin: Duration,
    /// Set while the calling thread may still read the response itself.
    direct: Option<Box<DirectRead>>,
    _marker: PhantomData<fn() -> R>,
}

impl<R> Execution<R> {
    pub(crate) fn new(
        token: ExecutionToken,
        rx: oneshot::Receiver<RawResult>,
        decode: Decoder<R>,
        spin: Duration,
        direct: Option<Box<DirectRead>>,
    ) -> Self {
        Execution { token, rx, decode, spin, direct, _marker: PhantomData }
    }

    /// The token to pass to [`crate::Engine::cancel`].
    pub fn token(&self) -> &ExecutionToken {
        &self.token
    }

    /// Blocks the calling thread until the execution completes. When the worker runs
    /// on another core than the caller, it first polls for up to
    /// `Config::wait_spin` (a parked thread costs tens of µs to wake in a VM), then
    /// parks; on the worker's own core polling would only keep the worker waiting.
    /// A request this thread handed to its worker (`Config::caller_reads`) has its
    /// response read here, straight from the worker's socket.
    pub fn wait(mut self) -> Result<Response<R>> {
        if let Some(direct) = self.direct.take() {
            if let Some(raw) = (*direct).read(self.spin) {
                return finish(Ok(raw), self.decode);
            }
        }
        let start = std::time::Instant::now();
        while start.elapsed() < self.spin {
            match self.rx.try_recv() {
                Ok(Some(raw)) => return finish(raw, self.decode),
                Ok(None) => std::hint::spin_loop(),
                Err(_) => break,
            }
        }
        futures_executor::block_on(self)
    }
}

impl<R> Drop for Execution<R> {
    fn drop(&mut self) {
        if let Some(direct) = self.direct.take() {
            // Nobody will wait on this thread: the engine thread reads the response
            // (and drops it), as for any execution nobody waits for.
            direct.leave_to_engine();
        }
    }
}

impl<R> Future for Execution<R> {
    type Output = Result<Response<R>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(direct) = self.direct.take() {
            // A future does not block: the engine thread reads the response.
            direct.leave_to_engine();
        }
        let decode = self.decode;
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(raw)) => Poll::Ready(finish(raw, decode)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Internal(
                "the engine dropped the execution without completing it".into(),
            ))),
        }
    }
}
