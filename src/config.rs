//! Engine, load and execute configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where the runner and its workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Runner inside gVisor (`runsc`), workers additionally in their own namespaces.
    Gvisor,
    /// As `Gvisor`, with `runsc --debug --strace` logs kept.
    GvisorDebug,
    /// Runner directly on the host in fresh user/mount/net/IPC/UTS namespaces over a
    /// read-only root; workers in their own user/PID/IPC/UTS namespaces. No gVisor.
    Minimal,
}

impl Mode {
    /// Name used on the command line and in reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Gvisor => "gvisor",
            Mode::GvisorDebug => "gvisor-debug",
            Mode::Minimal => "minimal",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Mode> {
        match s {
            "gvisor" => Ok(Mode::Gvisor),
            "gvisor-debug" => Ok(Mode::GvisorDebug),
            "minimal" => Ok(Mode::Minimal),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown mode {other:?}: use gvisor, gvisor-debug or minimal"
            ))),
        }
    }
}

/// Syscall filtering level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SyscallFilter {
    /// No seccomp filter at all (namespaces, no capabilities and the read-only root
    /// still apply).
    No,
    /// The runner and everything it starts get a denylist of syscalls a supervisor
    /// never needs (mount, unshare, ptrace, bpf, io_uring, kexec, ...). The UDF is
    /// otherwise unfiltered.
    WorkerEngine,
    /// `WorkerEngine`, plus a default-deny allowlist on every worker: plain
    /// computation, memory, time and I/O on the fds it was given; no sockets, no
    /// fork, no IPC, no kill. Denied syscalls fail with EPERM.
    #[default]
    Untrusted,
}

impl SyscallFilter {
    /// Name used on the command line and in the runner's arguments.
    pub fn as_str(&self) -> &'static str {
        match self {
            SyscallFilter::No => "no",
            SyscallFilter::WorkerEngine => "worker-engine",
            SyscallFilter::Untrusted => "untrusted",
        }
    }
}

impl std::str::FromStr for SyscallFilter {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<SyscallFilter> {
        match s {
            "no" => Ok(SyscallFilter::No),
            "worker-engine" => Ok(SyscallFilter::WorkerEngine),
            "untrusted" => Ok(SyscallFilter::Untrusted),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown syscall filter {other:?}: use no, worker-engine or untrusted"
            ))),
        }
    }
}

/// Address-space limit applied to every worker (RLIMIT_AS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub soft_bytes: u64,
    pub hard_bytes: u64,
}

/// Engine configuration. `Config::default()` is the recommended production setup
/// for `minimal` mode.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// CPU cores to pin the io_uring engine threads to, one thread per core. Empty:
    /// one thread per core this process may run on.
    pub cores: Vec<usize>,
    /// CPU cores the sandbox (runner and workers; in gVisor modes the whole runsc
    /// sandbox) may run on. Empty: no restriction.
    pub runner_cores: Vec<usize>,
    /// Kernel-side submission polling (IORING_SETUP_SQPOLL) with this idle time
    /// before the poller sleeps. Saves the `io_uring_enter` syscall per batch but
    /// burns a core while busy: only with a spare core. `None` (default): off.
    pub sqpoll_idle: Option<Duration>,
    /// While an execution awaits its response, an engine thread polls its ring for up
    /// to this long before sleeping: lower latency (no sleep/wake-up), more CPU.
    /// Only worth it when workers run on other cores than the engine threads
    /// (`runner_cores`); turns `pin_workers` off. Zero turns it off.
    pub busy_poll: Duration,
    /// With a backlog, an engine thread lets completions accumulate before it wakes
    /// up (io_uring min_wait), so one wake-up handles a batch: 100 µs per worker
    /// slot of the shard (all code tokens), at least 200 µs and at most this long,
    /// and never past the shard's next timer (timeouts fire on time), added at
    /// most once per step of an execution. A backlog is at least
    /// `batch_min_in_flight` executions on the shard (queued or running), some of
    /// them queued for a worker: the pool is not keeping up, and each wake-up saved
    /// leaves CPU to the workers. A lone request, or a load the pool keeps up with,
    /// never waits for it. Zero turns it off. Needs Linux 6.12 (ignored before, and
    /// with SQPOLL). Measurements: BENCHMARKS.md, twenty-first session.
    pub batch_wait: Duration,
    /// See `batch_wait`.
    pub batch_min_in_flight: usize,
    /// A batched wait (see `batch_wait`) ends early once this many completions are
    /// ready. The default, 64, is more than a shard collects in 1 ms here, so the
    /// wait runs its full length. Ending it early loses most of what it saves: with
    /// 10 workers and 500 µs waits, 3 gave 0.88 wake-ups and 48-51 µs of engine CPU
    /// per execution against 0.46 and 28-29 µs with 64 (BENCHMARKS.md,
    /// twenty-first session). Values below 1 count as 1.
    pub batch_want: usize,
    /// `minimal` mode with `runner_cores` empty: the runner thread serving an
    /// engine thread, and the workers it starts, run on that engine thread's core,
    /// so every hand-off between them stays on one core and no new process is
    /// migrated at exec. Off: the scheduler places workers on any allowed core.
    /// Ignored when `busy_poll` is on (a polling engine thread would keep its own
    /// workers off their core).
    pub pin_workers: bool,
    /// `minimal` mode: the runner makes each worker's channel (a socketpair) and
    /// the engine thread takes its end straight from the runner's descriptor table
    /// (`pidfd_getfd`, which needs ptrace rights over the runner: in practice an
    /// engine running as root or with CAP_SYS_PTRACE; probed at start). No Unix socket then travels in a control message, which saves the
    /// engine thread the socketpair and the `SCM_RIGHTS` send, and the kernel the
    /// Unix-socket garbage collection it queues when a socket closes while others
    /// are in flight. Off, or where `pidfd_getfd` is refused, and always in the
    /// gVisor modes (the runner's descriptors live in the sandbox's kernel), the
    /// engine thread makes the pair and sends the worker's end with the spawn order.
    pub runner_channels: bool,
    /// The calling thread hands a request to a ready worker itself: it claims the
    /// worker, queues the execution on its engine thread without waking it, and
    /// writes the request (up to `hand_over_max_bytes`; on the shared-memory transport it places
    /// it in the region and rings the doorbell) with one non-blocking `send`. The
    /// engine thread then wakes once per execution, for the answer, instead of
    /// also for the request. Off: every request goes through the engine thread.
    pub hand_over: bool,
    /// Largest request frame (socket transport) the calling thread hands over;
    /// larger ones go through the engine thread. Up to a fresh socket's send buffer
    /// (~200 KiB) one `send` takes it all; beyond, the engine thread writes the
    /// rest (the caller never blocks).
    pub hand_over_max_bytes: usize,
    /// `Execution::wait` polls for the answer this long before it parks the
    /// calling thread, when the execution's worker runs on another core than the
    /// caller (requests prefer the shard on the caller's own core, so this is for
    /// the rest). A parked thread on an idle vCPU costs tens of µs to wake in a VM;
    /// polling on the worker's own core would keep the worker off it. Zero: park
    /// at once.
    pub wait_spin: Duration,
    /// `Execution::wait` on a handed-over execution reads the response from the
    /// worker's socket on the calling thread, so the worker's answer wakes the
    /// caller directly instead of the engine thread, which then woke the caller
    /// (one thread hop less). Applies to code tokens without host calls, log capture
    /// or shared memory, and to responses of one frame up to 64 KiB (a frame written
    /// in pieces is waited for); anything else is left to the engine thread, with
    /// nothing consumed. For those
    /// tokens, a worker that becomes ready while its shard has nothing in flight
    /// gets no receive posted (under load every idle worker gets one, so callbacks
    /// and futures cost the engine thread no extra wake-up): if it closes its
    /// channel while idle and keeps running, that is found when a request is written
    /// to it (that request fails), and bytes it writes before its request are read
    /// as its response. Off: the engine thread reads every response.
    pub caller_reads: bool,
    /// For the code tokens `caller_reads` applies to: a worker spawned while its
    /// shard has nothing in flight is offered to callers at once, before its ready
    /// byte arrives, and gets no receive posted for that byte. The caller that
    /// claims it takes the ready byte from the socket itself (one non-blocking
    /// `recv`) before it writes the request; if the byte is not there yet, it
    /// writes nothing and leaves the execution to the engine thread, which waits
    /// for the byte as for any starting worker. The protocol does not change: a
    /// request handed over this way is written only after its worker's ready
    /// byte, and its timeout starts then. What it saves is the engine thread's
    /// wake-up for each ready byte in sequential traffic (about one of the two per
    /// execution, see BENCHMARKS.md). An unconfirmed worker nobody claims is
    /// checked at `worker_start_timeout`. Off: every ready byte is read by the
    /// engine thread.
    pub lazy_readiness: bool,
    /// Under load, a code token's oldest queued execution is bound to each worker
    /// of that token as it is spawned, and its request written to the worker's
    /// socket at once, before the worker's ready byte (socket transport; not for
    /// shared-memory tokens). The worker reads it right after its ready byte, as
    /// the protocol has it (DESIGN §5), without waiting for the engine thread to
    /// see the byte and answer it; the engine thread reads the ready byte with the
    /// response on one receive, and a ready byte it consumes no longer wakes a
    /// worker sleeping in `read` for nothing. Measured: a few per cent of the
    /// engine threads' CPU under load at most (BENCHMARKS.md, eighteenth
    /// session). What does not change: the timeout starts when the engine thread
    /// sees the ready byte (with the response, the response is already in); a
    /// worker that fails before its ready byte is a start failure of its token
    /// (back-off), and the execution bound to it fails with that error, as a
    /// queued execution does with a failed start; if the sandbox dies before the
    /// ready byte, the execution goes back to its queue (the worker sent nothing,
    /// so by the protocol it never read the request) and runs in the restarted
    /// sandbox; the request is read only by the worker it was written to.
    /// `Metrics::written_before_ready` tells such executions. Off: a request is
    /// written only after its worker's ready byte.
    pub early_dispatch: bool,
    /// The sandbox may hold back the exit reports of workers that answered and
    /// exited cleanly, and send up to this many in one message, so the engine
    /// thread wakes once for several executions instead of once each (in
    /// sequential traffic that report is its only wake-up). A shard holds at most
    /// its share of a code token's pool less one this way (a pool of 10 on two
    /// shards: batches of 4), never for logging or shared-memory tokens (their
    /// exit completes an execution), and never a failed or killed worker's
    /// report. Meanwhile the worker's record and channel stay
    /// (`Engine::live_workers` counts it), and a caller-read execution's
    /// follow-up (its slot's refill) waits for the engine thread's next wake-up:
    /// the batch, or a request that finds no ready worker. So a burst that comes
    /// while a batch is held finds as few as one worker of the shard's share
    /// ready, and the rest of the burst waits for fresh workers: where bursts
    /// matter more than the engine thread's CPU, lower this (2 keeps more of the
    /// pool ready). Below 2: every report is sent at once.
    pub exit_report_batch: usize,
    /// Longest a report is held back (see `exit_report_batch`). An execution whose
    /// UDF exits with status 0 without answering fails when that report arrives, so
    /// up to this much later; a worker that closed its channel is given this much
    /// longer to exit before it is killed.
    pub exit_report_hold: Duration,
    pub syscall_filter: SyscallFilter,
    /// Host paths bind-mounted read-only into the worker root (for dynamically
    /// linked UDFs): directories or single files. Symlinks are followed; missing
    /// paths are skipped with a warning. The default includes the dynamic loader's
    /// cache, `/etc/ld.so.cache` (alone: nothing else of `/etc`): without it glibc's
    /// loader makes 18-19 failed path probes per worker before it finds its first
    /// library, each a syscall (~20-30 µs per glibc worker natively, a gVisor
    /// syscall each in gVisor modes).
    pub lib_mounts: Vec<PathBuf>,
    pub memory_limit: Option<MemoryLimit>,
    /// Path of the `roma-byob-runner` binary. `None`: `$ROMA_BYOB_RUNNER`, then next
    /// to the current executable (and its parent directory).
    pub runner_path: Option<PathBuf>,
    /// Path of gVisor's `runsc` for the gVisor modes. `None`: `$PATH`, then
    /// `/usr/bin/runsc` and `/usr/local/bin/runsc`.
    pub runsc_path: Option<PathBuf>,
    /// Largest response frame accepted from a UDF; larger ones fail the execution.
    pub max_response_bytes: usize,
    /// Largest stdout (and stderr) kept per execution of a logging code token;
    /// writes beyond it fail with EFBIG inside the UDF.
    pub max_log_bytes: u64,
    /// Threads running host functions (Host API callbacks).
    pub host_api_threads: usize,
    /// A worker that has not written its ready byte this long after its spawn
    /// order is killed and counted as a start-up failure (the slot respawns with
    /// back-off, and the oldest queued execution of its code token fails with the
    /// reason). Without it a UDF that hangs before its ready byte would hold its
    /// pool slot for ever.
    pub worker_start_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mode: Mode::Minimal,
            cores: Vec::new(),
            runner_cores: Vec::new(),
            sqpoll_idle: None,
            busy_poll: Duration::ZERO,
            batch_wait: Duration::from_millis(1),
            batch_min_in_flight: 8,
            batch_want: 64,
            pin_workers: true,
            runner_channels: true,
            hand_over: true,
            hand_over_max_bytes: 64 << 10,
            wait_spin: Duration::from_micros(100),
            caller_reads: true,
            lazy_readiness: true,
            early_dispatch: true,
            exit_report_batch: 4,
            exit_report_hold: Duration::from_millis(10),
            syscall_filter: SyscallFilter::Untrusted,
            lib_mounts: vec!["/lib".into(), "/lib64".into(), "/usr/lib".into(), "/etc/ld.so.cache".into()],
            memory_limit: None,
            runner_path: None,
            runsc_path: None,
            max_response_bytes: 64 << 20,
            max_log_bytes: 1 << 20,
            host_api_threads: 2,
            worker_start_timeout: Duration::from_secs(10),
        }
    }
}

/// Options of [`crate::Engine::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pre-started workers kept ready (must be at least 1).
    pub workers: usize,
    /// Capture each execution's stdout/stderr and return them with the response.
    pub log_egress: bool,
    /// Shared-memory transport: each worker gets a memfd region of this many bytes
    /// of its own (fresh, or reused after a wipe that leaves nothing of earlier
    /// executions); requests and responses travel through it with a one-byte
    /// doorbell on the socket (see README, "Shared-memory transport"). The UDF must
    /// support it. `None`: plain Roma protocol on the socket.
    pub shared_memory: Option<usize>,
    /// Let the UDF call registered host functions during its executions (see
    /// `Engine::register_host_function`). Off: a host call gets an error reply.
    pub host_api: bool,
    /// Zygote start (`minimal` mode): the runner execs the binary once as a
    /// template, stopped before the binary's own constructors and `main`, and forks
    /// every worker from it, so workers skip the dynamic loader and the C
    /// library's start-up (BENCHMARKS.md, "Zygote start"). Each execution still
    /// gets a fresh process (a copy-on-write copy of a template that never saw a
    /// request) in the same sandbox. Trade-offs: the workers of one template share
    /// its address-space layout, stack canary and pointer guard (ASLR no longer
    /// differs between executions of this code token), and the template runs the
    /// constructors of the binary's libraries (from the library mounts, which
    /// must therefore hold trusted code) while it holds the runner's seccomp-gate
    /// key. Only dynamically linked glibc binaries that run no code of their own
    /// before `main` qualify (no preinit array, no IFUNC resolver, no exported
    /// function a library could call); `load` says which rule a binary breaks.
    pub zygote: bool,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions { workers: 1, log_egress: false, shared_memory: None, host_api: false, zygote: false }
    }
}

/// Options of [`crate::Engine::execute`].
#[derive(Clone, Debug)]
pub struct ExecuteOptions {
    /// How long the execution may wait for a ready worker before failing with
    /// `DeadlineExceeded("no workers available ...")`.
    pub worker_wait_timeout: Duration,
    /// Deadline for the whole execution once a worker took it; on expiry the worker
    /// is killed and the execution fails with `DeadlineExceeded`.
    pub timeout: Duration,
    /// Passed to every host function the UDF calls during this execution.
    pub metadata: HashMap<String, String>,
}

impl Default for ExecuteOptions {
    fn default() -> ExecuteOptions {
        ExecuteOptions {
            worker_wait_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            metadata: HashMap::new(),
        }
    }
}
