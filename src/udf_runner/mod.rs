//! The in-sandbox runner: receives binaries and spawn orders from the host engine on
//! one control socket per engine ring, starts workers through [`spawn::Spawner`],
//! reaps them and reports every exit.
//!
//! Threads: set-up (`unshare`, `pivot_root`, the seccomp filter) runs while the
//! process is single-threaded; then each control connection gets its own thread,
//! which reads that connection's orders and spawns its workers, so the engine's
//! shards spawn in parallel (a spawn holds its thread for the whole
//! `clone(CLONE_VFORK)` → `execveat`, ~100-200 µs). The main thread reaps every
//! worker (signalfd for SIGCHLD, `waitpid(-1)`) and reports exits on the owning
//! connection. Worker table and `waitpid` share one lock, so a pid in the table
//! is never a recycled one when a connection thread signals it.

mod conn;
pub mod spawn;
pub mod zygote;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::ipc::control::{
    host_to_runner, runner_to_host, Channel, Channels, Exited, HostToRunner, RunnerToHost, SpawnFailed, StartFailed, Started,
};
use crate::ipc::{fdpass, frame};
use crate::sandbox::{gate, policy, rootfs, seccomp};
use spawn::{FdSlots, SpawnPlan, Spawner};
use conn::ConnThread;
use zygote::Zygote;

/// Runner settings, passed as command-line arguments by the engine.
#[derive(Debug, Default)]
pub struct RunnerArgs {
    pub mode: String,
    pub filter: String,
    pub lib_mounts: Vec<PathBuf>,
    pub control_fds: Vec<RawFd>,
    pub rlimit_as: Option<(u64, u64)>,
    pub max_log_bytes: u64,
    pub scratch: PathBuf,
    /// gVisor: further control connections arrive as SCM_RIGHTS fds on the first
    /// one (runsc cannot pass extra fds to the container).
    pub receive_controls: usize,
    /// Core for each control connection's thread (and so its workers), in order;
    /// empty: no pinning.
    pub conn_cores: Vec<usize>,
}

impl RunnerArgs {
    /// Renders the arguments for the runner's command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--mode".into(), self.mode.clone(), "--filter".into(), self.filter.clone()];
        for m in &self.lib_mounts {
            v.push("--mount".into());
            v.push(m.display().to_string());
        }
        let fds: Vec<String> = self.control_fds.iter().map(|f| f.to_string()).collect();
        v.push("--control-fds".into());
        v.push(fds.join(","));
        if let Some((s, h)) = self.rlimit_as {
            v.push("--rlimit-as".into());
            v.push(format!("{s}:{h}"));
        }
        v.push("--max-log-bytes".into());
        v.push(self.max_log_bytes.to_string());
        v.push("--scratch".into());
        v.push(self.scratch.display().to_string());
        if self.receive_controls > 0 {
            v.push("--receive-controls".into());
            v.push(self.receive_controls.to_string());
        }
        if !self.conn_cores.is_empty() {
            let cores: Vec<String> = self.conn_cores.iter().map(|c| c.to_string()).collect();
            v.push("--conn-cores".into());
            v.push(cores.join(","));
        }
        v
    }

    /// Parses the runner's command line.
    pub fn parse(args: &[String]) -> Result<RunnerArgs, String> {
        let mut out = RunnerArgs { scratch: PathBuf::from("/tmp"), ..Default::default() };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--mode" => out.mode = value()?,
                "--filter" => out.filter = value()?,
                "--mount" => out.lib_mounts.push(value()?.into()),
                "--control-fds" => {
                    for part in value()?.split(',') {
                        out.control_fds.push(part.parse().map_err(|_| format!("bad fd {part:?}"))?);
                    }
                }
                "--rlimit-as" => {
                    let v = value()?;
                    let (s, h) = v.split_once(':').ok_or("--rlimit-as wants SOFT:HARD")?;
                    out.rlimit_as = Some((s.parse().map_err(|_| "bad soft limit")?, h.parse().map_err(|_| "bad hard limit")?));
                }
                "--max-log-bytes" => out.max_log_bytes = value()?.parse().map_err(|_| "bad --max-log-bytes")?,
                "--scratch" => out.scratch = value()?.into(),
                "--conn-cores" => {
                    for part in value()?.split(',') {
                        out.conn_cores.push(part.parse().map_err(|_| format!("bad core {part:?}"))?);
                    }
                }
                "--receive-controls" => {
                    out.receive_controls = value()?.parse().map_err(|_| "bad --receive-controls")?
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if out.control_fds.is_empty() {
            return Err("--control-fds is required".into());
        }
        Ok(out)
    }
}

struct Worker {
    conn: usize,
    worker_id: u64,
    code_id: u64,
    /// Its exit completes an execution (the engine delivers logs, or a response in
    /// shared memory, once the worker has exited): reported without delay.
    awaited: bool,
    /// This runner's copy of the host end of the worker's channel (`MakeChannels`),
    /// closed `HOST_END_GRACE` after the worker is reaped. The engine's own copy is
    /// then not the last one, so the socket's release (~10 µs of kernel work) runs
    /// here, on the reaping thread, rather than on an engine thread.
    host_end: Option<OwnedFd>,
    /// A zygote template, not a worker: reaped without a report.
    template: bool,
    /// Its clean exit may be held back this long, with up to `exit_batch - 1`
    /// others (`Spawn::exit_batch`; 0: reported at once).
    exit_batch: u32,
    exit_hold: std::time::Duration,
}

/// Clean exit reports held back for one connection (`Spawn::exit_batch`): the
/// engine thread then wakes once for several workers' exits instead of once each.
/// A worker's slot is refilled when its execution completes (a command the engine
/// thread handles on its next wake-up); the report frees its record and closes its
/// channel, so it may wait.
#[derive(Default)]
struct Held {
    bytes: Vec<u8>,
    count: usize,
    /// Sent when `count` reaches this (the smallest batch of the held workers) ...
    batch: usize,
    /// ... or at this time (the earliest of their holds).
    due: Option<std::time::Instant>,
    host_ends: Vec<OwnedFd>,
}

impl Held {
    fn hold(&mut self, w: &mut Worker, status: i32, now: std::time::Instant) {
        Shared::exited(w.worker_id, status, &mut self.bytes);
        let batch = w.exit_batch as usize;
        self.batch = if self.count == 0 { batch } else { self.batch.min(batch) };
        self.count += 1;
        let due = now + w.exit_hold;
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
        self.host_ends.extend(w.host_end.take());
    }

    /// Takes the held reports (to be sent first) and their host ends.
    fn take(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let out = (std::mem::take(&mut self.bytes), std::mem::take(&mut self.host_ends));
        *self = Held::default();
        out
    }
}

/// Nice value of the connection threads and so of every worker (see `ConnThread::run`).
const WORKER_NICE: libc::c_int = 10;

/// Every live worker, shared by the connection threads (which spawn and kill) and
/// the main thread (which reaps under the same lock).
#[derive(Default)]
struct Tables {
    pids: HashMap<libc::pid_t, Worker>,
    by_worker: HashMap<(usize, u64), libc::pid_t>,
    /// Reaped before the spawning thread registered them (workers that exit at
    /// once, or failed before exec).
    early: HashMap<libc::pid_t, i32>,
    /// Live workers whose exit the engine waits for (`Worker::awaited`).
    awaited: usize,
}

/// State every thread sees.
struct Shared {
    tables: Mutex<Tables>,
    /// The control connections; closed only when the runner returns.
    conns: Vec<OwnedFd>,
    /// Per connection, held while writing, so reports from the main thread and
    /// from the connection's thread never interleave.
    out: Vec<Mutex<ConnOut>>,
}

/// What one connection's writers share.
struct ConnOut {
    /// Still open?
    open: bool,
    /// A channel report that may wait (`MakeChannels::defer_us`): it goes out
    /// first with the next write on this connection (typically a batch of exit
    /// reports), or when its connection thread's deadline for it comes.
    deferred: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Sends encoded frames on connection `idx`, after any deferred channel
    /// report; false once it is closed. Empty `bytes`: sends only what is deferred.
    fn send_frames(&self, idx: usize, bytes: &[u8]) -> bool {
        let mut out = lock(&self.out[idx]);
        let joined;
        let bytes = if out.deferred.is_empty() {
            bytes
        } else {
            let mut all = std::mem::take(&mut out.deferred);
            all.extend_from_slice(bytes);
            joined = all;
            &joined[..]
        };
        if out.open && !bytes.is_empty() && fdpass::send_with_fds(self.conns[idx].as_raw_fd(), bytes, &[]).is_err() {
            out.open = false;
        }
        out.open
    }

    /// Keeps encoded frames for the next write on connection `idx` (see
    /// `ConnOut::deferred`); false once it is closed.
    fn defer_frames(&self, idx: usize, bytes: &[u8]) -> bool {
        let mut out = lock(&self.out[idx]);
        if out.open {
            out.deferred.extend_from_slice(bytes);
        }
        out.open
    }

    fn close(&self, idx: usize) {
        let mut out = lock(&self.out[idx]);
        out.open = false;
        out.deferred.clear();
    }

    fn send(&self, idx: usize, msg: runner_to_host::Msg) -> bool {
        self.send_frames(idx, &frame::encode(&RunnerToHost { msg: Some(msg) }))
    }

    fn exited(worker_id: u64, status: i32, into: &mut Vec<u8>) {
        let msg = runner_to_host::Msg::Exited(Exited { worker_id, wait_status: status });
        RunnerToHost { msg: Some(msg) }.encode_length_delimited(into).ok();
    }
}

/// What a connection thread needs to start workers.
struct Settings {
    devnull: OwnedFd,
    /// The seccomp gate each connection thread installs on itself before it spawns
    /// (level `untrusted`; workers inherit it, see `crate::sandbox::gate`).
    gate: Option<seccomp::Program>,
    /// gVisor cannot exec a host memfd reliably (ENXIO; `/proc/self/exe` would read
    /// `host:[N]`): binaries are copied into a sandbox memfd at load.
    copy_binaries: bool,
    /// Workers share the fd table until they unshare its low part (`spawn::FdSlots`).
    /// Minimal mode only: this gVisor build's handling of CLONE_FILES children and
    /// CLOSE_RANGE_UNSHARE is not relied on (were the flag ignored, the child's
    /// dup2s would land in the runner's own table).
    share_files: bool,
    /// Connection threads wait for control messages in `ppoll` (minimal mode; in
    /// gVisor each extra syscall costs the runner 15-35 µs).
    poll_wait: bool,
    /// Connection threads, and so workers, run as SCHED_BATCH (minimal mode; see
    /// `ConnThread::run`).
    batch_policy: bool,
    /// Namespace flags beyond user/PID/IPC/UTS for every worker.
    extra_clone_flags: libc::c_int,
    rlimit_as: Option<libc::rlimit>,
    rlimit_fsize: libc::rlimit,
    conn_cores: Vec<usize>,
}

fn send(fd: RawFd, msg: runner_to_host::Msg) -> io::Result<()> {
    let bytes = frame::encode(&RunnerToHost { msg: Some(msg) });
    fdpass::send_with_fds(fd, &bytes, &[])
}

/// Entry point of the runner binary; returns the process exit code.
pub fn run(args: Vec<String>) -> i32 {
    let args = match RunnerArgs::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("roma-byob-runner: {e}");
            return 2;
        }
    };
    let first = args.control_fds[0];
    match setup(&args) {
        Ok((conns, settings, warnings)) => {
            for c in &conns {
                if let Err(e) = send(c.as_raw_fd(), runner_to_host::Msg::Started(Started { warnings: warnings.clone() })) {
                    eprintln!("roma-byob-runner: cannot report start-up: {e}");
                    return 1;
                }
            }
            serve(conns, settings);
            0
        }
        Err(e) => {
            let _ = send(first, runner_to_host::Msg::StartFailed(StartFailed { error: e.clone() }));
            eprintln!("roma-byob-runner: {e}");
            1
        }
    }
}

fn setup(args: &RunnerArgs) -> Result<(Vec<OwnedFd>, Settings, Vec<String>), String> {
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("open /dev/null: {e}"))?;
    let mut control_fds: Vec<OwnedFd> = args
        .control_fds
        .iter()
        // SAFETY: the engine passed these fds to us; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if args.receive_controls > 0 {
        let mut got = Vec::new();
        let mut byte = [0u8; 16];
        while got.len() < args.receive_controls {
            let n = fdpass::recv_with_fds(control_fds[0].as_raw_fd(), &mut byte, &mut got)
                .map_err(|e| format!("receive control connections: {e}"))?;
            if n == 0 {
                return Err("the engine closed the control connection during start-up".into());
            }
        }
        control_fds.extend(got);
    }
    let mut warnings = Vec::new();
    let gvisor = match args.mode.as_str() {
        "minimal" => {
            warnings.extend(rootfs::enter_minimal_root(&args.lib_mounts, &args.scratch).map_err(|e| format!("minimal sandbox: {e}"))?);
            false
        }
        "gvisor" | "gvisor-debug" => {
            // The OCI bundle made the container's root the read-only worker root, and
            // runsc gave the runner fresh namespaces with no network. This runsc
            // rejects MS_REC, remount and pivot_root, so the runner does no mount work.
            warnings.push(
                "gvisor: no user namespace, pivot_root or read-only remount of the runner's own (this runsc rejects MS_REC, remount and pivot_root); the container's read-only OCI root stands in: libraries, the runner binary, gVisor's read-only /dev nodes, and empty read-only /proc, /sys and /tmp".into(),
            );
            true
        }
        other => return Err(format!("unsupported mode {other:?}")),
    };
    // The runner's own filter, and the gate its connection threads add on
    // themselves (see `policy`: at level `untrusted` the runner holds the
    // allowlist widened by its own needs, and the gate takes those needs away
    // again from anything that does not pass the runner's key; workers inherit
    // both and load no filter of their own).
    let (runner_filter, gate) = match args.filter.as_str() {
        "no" => (None, None),
        "worker-engine" => (Some(policy::runner_denylist()), None),
        "untrusted" => {
            let key = gate::random_key().map_err(|e| format!("draw the seccomp gate key: {e}"))?;
            gate::set_key(key);
            (Some(policy::untrusted_runner_envelope()), Some(policy::untrusted_worker_gate(key)))
        }
        other => return Err(format!("unknown filter level {other:?}")),
    };
    let gate = match gate {
        Some(filter) => Some(filter.compile().map_err(|e| format!("compile the seccomp gate: {e}"))?),
        None => None,
    };
    // Installed while the process has one thread: a seccomp filter binds the thread
    // that installs it and the threads and processes it creates afterwards.
    if let Some(filter) = runner_filter {
        let prog = filter.compile().map_err(|e| format!("compile runner seccomp filter: {e}"))?;
        // SAFETY: prctl on our own process.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(format!("prctl(NO_NEW_PRIVS): {}", io::Error::last_os_error()));
        }
        prog.install().map_err(|e| format!("install runner seccomp filter: {e}"))?;
    }
    // SIGCHLD is handled through a signalfd; blocked before any thread exists, so
    // every thread inherits the mask and the signal stays pending for the signalfd.
    // SAFETY: sigset manipulation on a local set, then blocking it for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let fsize = args.max_log_bytes;
    let settings = Settings {
        devnull: devnull.into(),
        gate,
        copy_binaries: gvisor,
        share_files: !gvisor,
        poll_wait: !gvisor,
        batch_policy: !gvisor,
        // Minimal mode: the runner's own network namespace is empty, workers share
        // it. gVisor: the container has a loopback, so each worker gets its own.
        // An IPC namespace per worker keeps SysV/POSIX IPC objects apart; level
        // `untrusted` refuses every IPC syscall (EPERM), so it skips that namespace
        // (creating and tearing one down, with its mqueue mount and sysctl tables,
        // is a sizeable part of a spawn).
        extra_clone_flags: if gvisor { libc::CLONE_NEWNET } else { 0 }
            | if args.filter == "untrusted" { 0 } else { libc::CLONE_NEWIPC },
        rlimit_as: args.rlimit_as.map(|(s, h)| libc::rlimit { rlim_cur: s, rlim_max: h }),
        rlimit_fsize: libc::rlimit { rlim_cur: fsize, rlim_max: fsize },
        conn_cores: args.conn_cores.clone(),
    };
    Ok((control_fds, settings, warnings))
}

/// Shortest time between two reaps while exits come faster than this (see
/// `serve`): in six interleaved `demo` pairs (no-libc UDF), medians of 7 % less
/// CPU per execution in the engine threads and 12 % less in the runner
/// (BENCHMARKS.md, eighth session). A worker's slot is refilled when
/// its execution completes, not when its exit is reported: the report only names
/// a failure's cause and frees the engine's record of the worker. Workers whose
/// exit completes an execution (logs, shared memory) are reported at once.
const REAP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// How long after reaping a worker this runner keeps its copy of the worker's host
/// end. The engine thread drops its own copy when it is done with the worker, often
/// only on the exit report (when the caller read the response); closed here after
/// that, the copy is the last one, and the socket's release runs on this thread
/// rather than on the engine's.
const HOST_END_GRACE: std::time::Duration = std::time::Duration::from_millis(5);

/// Runs one thread per control connection and reaps on this one until every
/// connection is closed; then kills and reaps whatever is left.
fn serve(conns: Vec<OwnedFd>, settings: Settings) {
    // SAFETY: creating a signalfd for the SIGCHLD blocked in setup.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if sfd < 0 {
        eprintln!("roma-byob-runner: signalfd: {}", io::Error::last_os_error());
        return;
    }
    // SAFETY: fresh fd from signalfd.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    // Connection threads write a byte here when they finish.
    let mut pipe = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        eprintln!("roma-byob-runner: pipe: {}", io::Error::last_os_error());
        return;
    }
    // SAFETY: fresh fds from pipe2, owned here.
    let (done_r, done_w) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let n = conns.len();
    let shared = Arc::new(Shared { tables: Mutex::new(Tables::default()), out: (0..n).map(|_| Mutex::new(ConnOut { open: true, deferred: Vec::new() })).collect(), conns });
    let settings = Arc::new(settings);
    let done_w = Arc::new(done_w);
    let mut threads = Vec::with_capacity(n);
    for idx in 0..n {
        let conn = ConnThread::new(idx, shared.clone(), settings.clone());
        let done = done_w.clone();
        let spawned = std::thread::Builder::new().name(format!("conn-{idx}")).spawn(move || {
            conn.run();
            // SAFETY: one byte from a local to our own pipe.
            unsafe { libc::write(done.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("roma-byob-runner: cannot start connection thread {idx}: {e}");
                let _ = shared.send(idx, runner_to_host::Msg::StartFailed(StartFailed { error: format!("runner thread: {e}") }));
                shared.close(idx);
                // SAFETY: as above.
                unsafe { libc::write(done_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
            }
        }
    }
    let mut finished = 0;
    let mut last_reap = std::time::Instant::now() - REAP_INTERVAL;
    // Host ends of reaped workers, closed HOST_END_GRACE after their exit report.
    let mut closing: std::collections::VecDeque<(std::time::Instant, Vec<OwnedFd>)> = Default::default();
    let mut held: Vec<Held> = (0..n).map(|_| Held::default()).collect();
    while finished < n {
        let now = std::time::Instant::now();
        let next = closing.front().map(|(due, _)| *due).into_iter().chain(held.iter().filter_map(|h| h.due)).min();
        let timeout_ms =
            next.map_or(-1, |due| due.saturating_duration_since(now).as_micros().div_ceil(1000).max(1) as libc::c_int);
        let mut pfds = [
            libc::pollfd { fd: sfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: done_r.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: pfds is a valid array of pollfd for the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("roma-byob-runner: poll: {}", io::Error::last_os_error());
            break;
        }
        if pfds[0].revents != 0 {
            // Under load, exits are reported in batches at most every
            // REAP_INTERVAL: fewer wake-ups of this thread and of the engine threads.
            // Not while the engine waits for some worker's exit to answer.
            let since = last_reap.elapsed();
            if since < REAP_INTERVAL && lock(&shared.tables).awaited == 0 {
                std::thread::sleep(REAP_INTERVAL - since);
            }
            last_reap = std::time::Instant::now();
            let mut info = [0u8; 128];
            // SAFETY: drain the signalfd into a local buffer.
            while unsafe { libc::read(sfd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {}
            let host_ends = reap(&shared, &mut held);
            if !host_ends.is_empty() {
                closing.push_back((std::time::Instant::now() + HOST_END_GRACE, host_ends));
            }
        }
        let now = std::time::Instant::now();
        for (idx, h) in held.iter_mut().enumerate() {
            if h.due.is_some_and(|due| due <= now) {
                let (bytes, host_ends) = h.take();
                shared.send_frames(idx, &bytes);
                closing.push_back((now + HOST_END_GRACE, host_ends));
            }
        }
        // After this round's exit reports are out.
        while closing.front().is_some_and(|(due, _)| *due <= now) {
            closing.pop_front();
        }
        if pfds[1].revents != 0 {
            let mut bytes = [0u8; 16];
            // SAFETY: reading into a local buffer.
            let got = unsafe { libc::read(done_r.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
            finished += got.max(0) as usize;
        }
    }
    // The engine is gone: kill and reap everything.
    {
        let tables = lock(&shared.tables);
        for pid in tables.pids.keys() {
            // SAFETY: signalling our own (unreaped) children.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
    loop {
        let mut status = 0;
        // SAFETY: reaping our own children.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            break;
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Reaps every exited worker and reports them, one write per control connection
/// for the whole batch (fewer wake-ups of the engine threads), except clean exits
/// that may wait (`Held`). Returns this runner's copies of the reported workers'
/// host ends (`Worker::host_end`).
fn reap(shared: &Shared, held: &mut [Held]) -> Vec<OwnedFd> {
    let mut batches: Vec<Vec<u8>> = vec![Vec::new(); shared.conns.len()];
    let mut host_ends = Vec::new();
    let now = std::time::Instant::now();
    {
        let mut tables = lock(&shared.tables);
        loop {
            let mut status = 0;
            // SAFETY: non-blocking reap of our own children (any thread's).
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            match tables.pids.remove(&pid) {
                Some(w) if w.template => {}
                Some(mut w) => {
                    tables.awaited -= usize::from(w.awaited);
                    tables.by_worker.remove(&(w.conn, w.worker_id));
                    let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                    if w.exit_batch > 0 && clean && !w.awaited {
                        held[w.conn].hold(&mut w, status, now);
                    } else {
                        Shared::exited(w.worker_id, status, &mut batches[w.conn]);
                        host_ends.extend(w.host_end);
                    }
                }
                None => {
                    tables.early.insert(pid, status);
                }
            }
        }
    }
    for (idx, bytes) in batches.into_iter().enumerate() {
        let h = &mut held[idx];
        // Held reports go out with any report that may not wait, or as a batch.
        let bytes = if h.count > 0 && (!bytes.is_empty() || h.count >= h.batch) {
            let (mut all, ends) = h.take();
            all.extend_from_slice(&bytes);
            host_ends.extend(ends);
            all
        } else {
            bytes
        };
        if !bytes.is_empty() {
            shared.send_frames(idx, &bytes);
        }
    }
    host_ends
}

/// Where channel fds (and code tokens' binaries) live when workers share this
/// runner's fd table until their first syscall (`spawn::FdSlots`): at this number
/// or above. That first syscall,
/// `close_range(slots' end, ~0, CLOSE_RANGE_UNSHARE)`, copies the table in whole
/// words of 64 fds, from 0 up to the word boundary above the last open fd below
/// the slots' end, then closes what it copied above that end. So every fd open at
/// a number between the slots and 64 is taken and released again by every spawn.
/// Channels are most of this runner's fds (both ends while in stock, then the
/// host end until `HOST_END_GRACE` after the worker is reaped), and most of them
/// sat there under load. A C loop of such spawns here: 87-91 µs each with 50
/// sockets open above 64, 95-97 µs with them below (BENCHMARKS.md, twentieth
/// session).
const CHANNEL_FD_FLOOR: libc::c_int = 64;

/// A worker's channel made here (`MakeChannels`): a connected Unix stream
/// socket pair, both ends close-on-exec, as (host end, worker end); with `high`,
/// both at `CHANNEL_FD_FLOOR` or above. Through the seccomp gate: `socketpair`
/// carries the key on connection threads.
fn make_channel(high: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    let args = [libc::AF_UNIX as usize, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as usize, 0, fds.as_mut_ptr() as usize, 0];
    // SAFETY: `fds` is a valid 2-element array for socketpair to fill.
    if unsafe { gate::syscall(libc::SYS_socketpair, args) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are fresh and owned by us.
    let (host, worker) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if !high {
        return Ok((host, worker));
    }
    Ok((move_up(host, CHANNEL_FD_FLOOR), move_up(worker, CHANNEL_FD_FLOOR)))
}

/// `fd` at number `floor` or above (the lowest free one), its old number closed;
/// `fd` itself where it is already there or the move fails (it works anywhere,
/// only spawns cost more).
fn move_up(fd: OwnedFd, floor: libc::c_int) -> OwnedFd {
    if fd.as_raw_fd() >= floor {
        return fd;
    }
    // SAFETY: duplicating an fd we own; the result is a fresh fd or -1.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    if moved < 0 {
        return fd;
    }
    // SAFETY: a fresh fd, owned from here on; dropping `fd` closes the old number.
    unsafe { OwnedFd::from_raw_fd(moved) }
}

/// SIGKILL for one of our unreaped workers, from a connection thread (through the
/// seccomp gate: `kill` carries the key).
fn kill_worker(pid: libc::pid_t) {
    // SAFETY: signalling our own unreaped child (the caller holds the worker table,
    // so the pid is not a recycled one).
    unsafe { gate::syscall(libc::SYS_kill, [pid as usize, libc::SIGKILL as usize, 0, 0, 0]) };
}

/// Copies a received binary into a memfd owned by this (sandboxed) process.
fn copy_to_memfd(src: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::unix::fs::FileExt;
    let name = c"roma-byob-udf".as_ptr() as usize;
    // SAFETY: static NUL-terminated name; returns a fresh fd (through the seccomp
    // gate: this runs on a connection thread).
    let fd = unsafe { gate::syscall(libc::SYS_memfd_create, [name, libc::MFD_CLOEXEC as usize, 0, 0, 0]) } as libc::c_int;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by us.
    let out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let input = std::fs::File::from(src.try_clone()?);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = input.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        out.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a byte into `a` and reads it from `b`: the two are one channel.
    fn connected(a: &OwnedFd, b: &OwnedFd) -> bool {
        // SAFETY: one-byte write and read on sockets we own, buffers on the stack.
        unsafe {
            let byte = [7u8];
            if libc::write(a.as_raw_fd(), byte.as_ptr().cast(), 1) != 1 {
                return false;
            }
            let mut got = [0u8];
            libc::read(b.as_raw_fd(), got.as_mut_ptr().cast(), 1) == 1 && got == byte
        }
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn channels_made_high_sit_at_the_floor_or_above_and_stay_connected() {
        let (host, worker) = make_channel(true).unwrap();
        assert!(host.as_raw_fd() >= CHANNEL_FD_FLOOR && worker.as_raw_fd() >= CHANNEL_FD_FLOOR, "{host:?} {worker:?}");
        assert!(cloexec(&host) && cloexec(&worker), "moved ends stay close-on-exec");
        assert!(connected(&host, &worker) && connected(&worker, &host));
    }

    #[test]
    fn move_up_keeps_an_fd_already_high() {
        let (host, worker) = make_channel(true).unwrap();
        let raw = host.as_raw_fd();
        let same = move_up(host, CHANNEL_FD_FLOOR);
        assert_eq!(same.as_raw_fd(), raw);
        assert!(connected(&same, &worker));
    }
}
