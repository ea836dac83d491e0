//! The in-sandbox runner: receives binaries and spawn orders from the host engine on
//! one control socket per engine ring, starts workers through [`spawn::Spawner`],
//! reaps them and reports every exit. Single-threaded on purpose (it `clone`s with
//! `CLONE_VM|CLONE_VFORK` and `unshare`s).

pub mod spawn;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use prost::Message;

use crate::ipc::control::{host_to_runner, runner_to_host, Exited, HostToRunner, RunnerToHost, SpawnFailed, StartFailed, Started};
use crate::ipc::{fdpass, frame};
use crate::sandbox::{policy, rootfs, seccomp};
use spawn::{SpawnPlan, Spawner};

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
}

struct Conn {
    fd: OwnedFd,
    decoder: frame::Decoder,
    fds: std::collections::VecDeque<OwnedFd>,
    binaries: HashMap<u64, OwnedFd>,
    workers: HashMap<u64, libc::pid_t>,
    open: bool,
}

struct Runner {
    conns: Vec<Conn>,
    pids: HashMap<libc::pid_t, Worker>,
    spawner: Spawner,
    devnull: OwnedFd,
    /// The compiled worker program and the fprog pointing into it (kept together so
    /// the pointer stays valid).
    worker_filter: Option<(seccomp::Program, libc::sock_fprog)>,
    /// gVisor cannot exec a host memfd reliably (ENXIO; `/proc/self/exe` would read
    /// `host:[N]`): binaries are copied into a sandbox memfd at load.
    copy_binaries: bool,
    rlimit_as: Option<libc::rlimit>,
    rlimit_fsize: libc::rlimit,
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
        Ok((mut runner, warnings)) => {
            for c in &runner.conns {
                if let Err(e) = send(c.fd.as_raw_fd(), runner_to_host::Msg::Started(Started { warnings: warnings.clone() })) {
                    eprintln!("roma-byob-runner: cannot report start-up: {e}");
                    return 1;
                }
            }
            runner.event_loop();
            0
        }
        Err(e) => {
            let _ = send(first, runner_to_host::Msg::StartFailed(StartFailed { error: e.clone() }));
            eprintln!("roma-byob-runner: {e}");
            1
        }
    }
}

fn setup(args: &RunnerArgs) -> Result<(Runner, Vec<String>), String> {
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
    // The runner's own filter and the one each worker adds before exec (see
    // `policy`: at level `untrusted` the runner holds the allowlist widened by its
    // own needs and workers install only the short narrowing, which is cheap to load).
    let (runner_filter, worker_filter) = match args.filter.as_str() {
        "no" => (None, None),
        "worker-engine" => (Some(policy::runner_denylist()), None),
        "untrusted" => (Some(policy::untrusted_runner_envelope()), Some(policy::untrusted_worker_narrowing())),
        other => return Err(format!("unknown filter level {other:?}")),
    };
    let worker_filter = match worker_filter {
        Some(filter) => {
            let prog = filter.compile().map_err(|e| format!("compile worker seccomp filter: {e}"))?;
            let fprog = prog.as_fprog();
            Some((prog, fprog))
        }
        None => None,
    };
    if let Some(filter) = runner_filter {
        let prog = filter.compile().map_err(|e| format!("compile runner seccomp filter: {e}"))?;
        // SAFETY: prctl on our own process.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(format!("prctl(NO_NEW_PRIVS): {}", io::Error::last_os_error()));
        }
        prog.install().map_err(|e| format!("install runner seccomp filter: {e}"))?;
    }
    // SIGCHLD is handled through a signalfd.
    // SAFETY: sigset manipulation on a local set, then blocking it for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let conns = control_fds
        .into_iter()
        .map(|fd| Conn {
            fd,
            decoder: frame::Decoder::default(),
            fds: Default::default(),
            binaries: HashMap::new(),
            workers: HashMap::new(),
            open: true,
        })
        .collect();
    let rlimit_as = args.rlimit_as.map(|(s, h)| libc::rlimit { rlim_cur: s, rlim_max: h });
    let fsize = args.max_log_bytes;
    Ok((
        Runner {
            conns,
            pids: HashMap::new(),
            // Minimal mode: the runner's own network namespace is empty, workers share
            // it. gVisor: the container has a loopback, so each worker gets its own.
            spawner: Spawner::new(if gvisor { libc::CLONE_NEWNET } else { 0 }),
            devnull: devnull.into(),
            worker_filter,
            copy_binaries: gvisor,
            rlimit_as,
            rlimit_fsize: libc::rlimit { rlim_cur: fsize, rlim_max: fsize },
        },
        warnings,
    ))
}

impl Runner {
    fn event_loop(&mut self) {
        // SAFETY: creating a signalfd for the SIGCHLD we blocked in setup.
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
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(self.conns.len() + 1);
            pfds.push(libc::pollfd { fd: sfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            for c in &self.conns {
                let fd = if c.open { c.fd.as_raw_fd() } else { -1 };
                pfds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: pfds is a valid array of pollfd for the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("roma-byob-runner: poll: {}", io::Error::last_os_error());
                break;
            }
            if pfds[0].revents != 0 {
                let mut info = [0u8; 128];
                // SAFETY: drain the signalfd into a local buffer.
                while unsafe { libc::read(sfd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {}
                self.reap();
            }
            for i in 0..self.conns.len() {
                if pfds[i + 1].revents != 0 {
                    self.read_conn(i, &mut buf);
                }
            }
            if self.conns.iter().all(|c| !c.open) {
                break;
            }
        }
        // The engine is gone: kill and reap everything.
        for pid in self.pids.keys() {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        while !self.pids.is_empty() {
            let mut status = 0;
            // SAFETY: reaping our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid <= 0 {
                break;
            }
            self.pids.remove(&pid);
        }
    }

    /// Reaps every exited worker and reports them, one write per control connection
    /// for the whole batch (fewer wake-ups of the engine threads).
    fn reap(&mut self) {
        let mut batches: Vec<Vec<u8>> = vec![Vec::new(); self.conns.len()];
        loop {
            let mut status = 0;
            // SAFETY: non-blocking reap of our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(w) = self.pids.remove(&pid) {
                let conn = &mut self.conns[w.conn];
                conn.workers.remove(&w.worker_id);
                if conn.open {
                    let msg = runner_to_host::Msg::Exited(Exited { worker_id: w.worker_id, wait_status: status });
                    RunnerToHost { msg: Some(msg) }.encode_length_delimited(&mut batches[w.conn]).ok();
                }
            }
        }
        for (idx, bytes) in batches.iter().enumerate() {
            if !bytes.is_empty() && fdpass::send_with_fds(self.conns[idx].fd.as_raw_fd(), bytes, &[]).is_err() {
                self.conns[idx].open = false;
            }
        }
    }

    fn read_conn(&mut self, idx: usize, buf: &mut [u8]) {
        let mut fds = Vec::new();
        let n = match fdpass::recv_with_fds(self.conns[idx].fd.as_raw_fd(), buf, &mut fds) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => 0,
            Err(e) => {
                eprintln!("roma-byob-runner: control socket {idx}: {e}");
                0
            }
        };
        let conn = &mut self.conns[idx];
        conn.fds.extend(fds);
        if n == 0 {
            self.close_conn(idx);
            return;
        }
        conn.decoder.extend(&buf[..n]);
        loop {
            let conn = &mut self.conns[idx];
            let msg = match conn.decoder.next_frame(1 << 20) {
                Ok(Some(body)) => HostToRunner::decode(body),
                Ok(None) => return,
                Err(e) => {
                    eprintln!("roma-byob-runner: control protocol error: {e}");
                    self.close_conn(idx);
                    return;
                }
            };
            match msg {
                Ok(HostToRunner { msg: Some(m) }) => {
                    if let Err(e) = self.handle(idx, m) {
                        eprintln!("roma-byob-runner: control protocol error: {e}");
                        self.close_conn(idx);
                        return;
                    }
                }
                Ok(HostToRunner { msg: None }) | Err(_) => {
                    eprintln!("roma-byob-runner: undecodable control message");
                    self.close_conn(idx);
                    return;
                }
            }
        }
    }

    fn close_conn(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        conn.open = false;
        for pid in conn.workers.values() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        conn.binaries.clear();
        conn.fds.clear();
    }

    fn handle(&mut self, idx: usize, msg: host_to_runner::Msg) -> Result<(), String> {
        match msg {
            host_to_runner::Msg::Load(load) => {
                let conn = &mut self.conns[idx];
                let mut fd = conn.fds.pop_front().ok_or("Load without its binary fd")?;
                if self.copy_binaries {
                    fd = copy_to_memfd(&fd).map_err(|e| format!("copy binary into the sandbox: {e}"))?;
                }
                conn.binaries.insert(load.code_id, fd);
            }
            host_to_runner::Msg::Unload(unload) => {
                let conn = &mut self.conns[idx];
                conn.binaries.remove(&unload.code_id);
                for (pid, w) in &self.pids {
                    if w.conn == idx && w.code_id == unload.code_id {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(*pid, libc::SIGKILL) };
                    }
                }
            }
            host_to_runner::Msg::Kill(kill) => {
                if let Some(pid) = self.conns[idx].workers.get(&kill.worker_id) {
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
            }
            host_to_runner::Msg::Spawn(sp) => {
                let conn = &mut self.conns[idx];
                let channel = conn.fds.pop_front().ok_or("Spawn without its channel fd")?;
                let logs = if sp.log {
                    let out = conn.fds.pop_front().ok_or("Spawn without its stdout fd")?;
                    let err = conn.fds.pop_front().ok_or("Spawn without its stderr fd")?;
                    Some((out, err))
                } else {
                    None
                };
                let shm = if sp.shm { Some(conn.fds.pop_front().ok_or("Spawn without its shared-memory fd")?) } else { None };
                let result = match conn.binaries.get(&sp.code_id) {
                    None => Err(format!("unknown code id {}", sp.code_id)),
                    Some(bin) => {
                        let null = self.devnull.as_raw_fd();
                        let plan = SpawnPlan {
                            binary: bin.as_raw_fd(),
                            channel: channel.as_raw_fd(),
                            stdin: null,
                            stdout: logs.as_ref().map_or(null, |l| l.0.as_raw_fd()),
                            stderr: logs.as_ref().map_or(null, |l| l.1.as_raw_fd()),
                            seccomp: self.worker_filter.as_ref().map(|(_, f)| f as *const libc::sock_fprog),
                            rlimit_as: self.rlimit_as,
                            rlimit_fsize: logs.as_ref().map(|_| self.rlimit_fsize),
                            shm: shm.as_ref().map(|f| f.as_raw_fd()),
                        };
                        self.spawner.spawn(&plan).map_err(|e| e.to_string())
                    }
                };
                drop(channel);
                drop(logs);
                drop(shm);
                match result {
                    Ok(pid) => {
                        self.conns[idx].workers.insert(sp.worker_id, pid);
                        self.pids.insert(pid, Worker { conn: idx, worker_id: sp.worker_id, code_id: sp.code_id });
                    }
                    Err(error) => {
                        let msg = runner_to_host::Msg::SpawnFailed(SpawnFailed { worker_id: sp.worker_id, error });
                        send(self.conns[idx].fd.as_raw_fd(), msg).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Copies a received binary into a memfd owned by this (sandboxed) process.
fn copy_to_memfd(src: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::unix::fs::FileExt;
    // SAFETY: static NUL-terminated name; returns a fresh fd.
    let fd = unsafe { libc::memfd_create(c"roma-byob-udf".as_ptr(), libc::MFD_CLOEXEC) };
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
