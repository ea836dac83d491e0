//! Starting the runner process for a mode and waiting for its start-up report.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;

use super::gvisor::GvisorState;
use crate::ipc::control::{runner_to_host, RunnerToHost};
use crate::ipc::frame;
use crate::udf_runner::RunnerArgs;
use crate::{Config, Error, Mode, Result};

/// First fd number the runner's control connections get.
const FIRST_CONTROL_FD: RawFd = 3;
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds the runner binary: the configured path, `$ROMA_BYOB_RUNNER`, or next to
/// the current executable (or in its parent directory, for test binaries in deps/).
pub fn find_runner(config: &Config) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if let Some(p) = &config.runner_path {
        vec![p.clone()]
    } else if let Some(p) = std::env::var_os("ROMA_BYOB_RUNNER") {
        vec![PathBuf::from(p)]
    } else {
        let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
        let mut v = Vec::new();
        if let Some(dir) = exe.parent() {
            v.push(dir.join("roma-byob-runner"));
            if let Some(up) = dir.parent() {
                v.push(up.join("roma-byob-runner"));
            }
        }
        v
    };
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "the runner binary roma-byob-runner was not found (looked at {candidates:?}); build it with `cargo build` and set Config::runner_path or ROMA_BYOB_RUNNER"
        ))
    })
}

/// A running sandbox: the runner (minimal) or `runsc run` (gVisor) process.
pub struct Sandbox {
    child: Child,
    /// gVisor container id, when in a gVisor mode.
    container: Option<String>,
}

/// A started sandbox and the host ends of its control connections.
pub struct Launched {
    pub sandbox: Sandbox,
    pub controls: Vec<OwnedFd>,
    pub warnings: Vec<String>,
    /// A pidfd of the runner when the engine may take worker channels from its
    /// descriptor table (`Config::runner_channels`, minimal mode).
    pub runner: Option<Arc<OwnedFd>>,
}

/// Everything needed to (re)start the sandbox of one engine.
pub struct Launcher {
    config: Config,
    runner: PathBuf,
    shards: usize,
    gvisor: Option<GvisorState>,
}

impl Launcher {
    /// Prepares the mode (for gVisor: finds runsc, writes the bundle).
    pub fn new(config: &Config, shards: usize) -> Result<Launcher> {
        let runner = find_runner(config)?;
        let gvisor = match config.mode {
            Mode::Minimal => None,
            Mode::Gvisor | Mode::GvisorDebug => {
                let args = runner_args(config, shards, true).to_args();
                Some(GvisorState::create(config, &runner, &args)?)
            }
        };
        Ok(Launcher { config: config.clone(), runner, shards, gvisor })
    }

    /// Where gvisor-debug writes runsc's logs.
    pub fn debug_log_dir(&self) -> Option<&Path> {
        self.gvisor.as_ref().and_then(|g| g.debug_logs.as_deref())
    }

    /// Starts a sandbox and waits until the runner reports that it is set up.
    pub fn launch(&mut self) -> Result<Launched> {
        let shards = self.shards;
        let mut host_ends = Vec::new();
        let mut runner_ends = Vec::new();
        for _ in 0..shards {
            let (h, r) = crate::ipc::fdpass::stream_pair().map_err(|e| Error::io("socketpair", e))?;
            host_ends.push(h);
            runner_ends.push(r);
        }
        let (child, container) = match self.gvisor.as_mut() {
            None => (self.spawn_minimal(&runner_ends)?, None),
            Some(g) => {
                let (mut cmd, id) = g.command();
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(g.runner_log(&id))
                    .map_err(|e| Error::io("create the runner log", e))?;
                // runsc passes no extra fds: control 0 is the runner's stdin.
                let stdin = runner_ends[0].try_clone().map_err(|e| Error::io("dup control fd", e))?;
                cmd.stdin(Stdio::from(stdin)).stdout(Stdio::null()).stderr(Stdio::from(log));
                pin_command(&mut cmd, &self.config.runner_cores);
                let child = cmd.spawn().map_err(|e| Error::io(&format!("start {}", g.runsc.display()), e))?;
                // The other control connections travel over the first one.
                if shards > 1 {
                    let extra: Vec<RawFd> = runner_ends[1..].iter().map(|f| f.as_raw_fd()).collect();
                    crate::ipc::fdpass::send_with_fds(host_ends[0].as_raw_fd(), &[0], &extra)
                        .map_err(|e| Error::io("pass control connections to the sandbox", e))?;
                }
                (child, Some(id))
            }
        };
        drop(runner_ends);
        let mut sandbox = Sandbox { child, container };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut warnings = Vec::new();
        for (i, ctl) in host_ends.iter().enumerate() {
            match wait_started(ctl, deadline) {
                Ok(w) => {
                    if i == 0 {
                        warnings = w;
                    }
                }
                Err(e) => {
                    let detail = match (&self.gvisor, &sandbox.container) {
                        (Some(g), Some(id)) => {
                            let tail = g.log_tail(id);
                            if tail.is_empty() { String::new() } else { format!(" (runner log: {tail})") }
                        }
                        _ => String::new(),
                    };
                    self.destroy(&mut sandbox);
                    return Err(match e {
                        Error::Unavailable(m) => Error::Unavailable(format!("{m}{detail}")),
                        Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("{m}{detail}")),
                        other => other,
                    });
                }
            }
        }
        let runner = if self.gvisor.is_none() && self.config.runner_channels { runner_pidfd(sandbox.pid()) } else { None };
        Ok(Launched { sandbox, controls: host_ends, warnings, runner })
    }

    fn spawn_minimal(&self, runner_ends: &[OwnedFd]) -> Result<Child> {
        let args = runner_args(&self.config, self.shards, false);
        let raw_ends: Vec<RawFd> = runner_ends.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(&self.runner);
        cmd.args(args.to_args()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        // SAFETY: the closure only calls async-signal-safe fcntl/dup2/close_range.
        unsafe {
            cmd.pre_exec(move || {
                // Move the ends out of the way first, then down to 3, 4, ...
                let mut high = Vec::with_capacity(raw_ends.len());
                for &fd in &raw_ends {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if h < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, FIRST_CONTROL_FD + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                let first_free = (FIRST_CONTROL_FD as u32) + high.len() as u32;
                libc::syscall(libc::SYS_close_range, first_free, i32::MAX as u32, 0);
                Ok(())
            });
        }
        pin_command(&mut cmd, &self.config.runner_cores);
        cmd.spawn().map_err(|e| Error::io(&format!("start {}", self.runner.display()), e))
    }

    /// Waits up to `grace` for a sandbox whose control connections were closed to
    /// exit, kills it otherwise, and removes its gVisor container.
    pub fn stop(&self, sandbox: &mut Sandbox, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            match sandbox.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    let _ = sandbox.child.kill();
                    let _ = sandbox.child.wait();
                    break;
                }
            }
        }
        if let (Some(g), Some(id)) = (&self.gvisor, sandbox.container.take()) {
            g.delete(&id);
        }
    }

    /// Kills a sandbox at once and removes its gVisor container.
    pub fn destroy(&self, sandbox: &mut Sandbox) {
        self.stop(sandbox, Duration::ZERO);
    }

    /// Removes the mode's state directory (after the last sandbox is gone).
    pub fn cleanup(&mut self) {
        if let Some(g) = self.gvisor.take() {
            g.remove();
        }
    }
}

impl Sandbox {
    /// Pid of the sandbox's top process on the host (the runner in `minimal` mode,
    /// `runsc run` in the gVisor modes).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the sandbox process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// Restricts the started process (and so the whole sandbox) to `cores`.
fn pin_command(cmd: &mut Command, cores: &[usize]) {
    if cores.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        // SAFETY: as above; c was checked against the allowed cores.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity is async-signal-safe; `set` is moved into the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn runner_args(config: &Config, shards: usize, gvisor: bool) -> RunnerArgs {
    RunnerArgs {
        mode: config.mode.as_str().to_string(),
        filter: config.syscall_filter.as_str().to_string(),
        lib_mounts: config.lib_mounts.clone(),
        control_fds: if gvisor { vec![0] } else { (0..shards as RawFd).map(|i| FIRST_CONTROL_FD + i).collect() },
        rlimit_as: config.memory_limit.map(|m| (m.soft_bytes, m.hard_bytes)),
        max_log_bytes: config.max_log_bytes,
        scratch: PathBuf::from("/tmp"),
        receive_controls: if gvisor { shards - 1 } else { 0 },
        // Not with busy polling: a polling engine thread would keep its own workers
        // off the core they share.
        conn_cores: if config.pin_workers && config.busy_poll.is_zero() && !gvisor && config.runner_cores.is_empty() {
            // The engine's shard cores, as `Engine::new` computes them.
            let cores = if config.cores.is_empty() { crate::ring::allowed_cores() } else { config.cores.clone() };
            cores.into_iter().take(shards).collect()
        } else {
            Vec::new()
        },
    }
}

fn wait_started(fd: &OwnedFd, deadline: Instant) -> Result<Vec<String>> {
    let mut decoder = frame::Decoder::default();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(body) = decoder.next_frame(1 << 20).map_err(Error::Internal)? {
            let msg = RunnerToHost::decode(body)
                .map_err(|e| Error::Internal(format!("undecodable start-up message from the runner: {e}")))?;
            return match msg.msg {
                Some(runner_to_host::Msg::Started(s)) => Ok(s.warnings),
                Some(runner_to_host::Msg::StartFailed(f)) => {
                    Err(Error::FailedPrecondition(format!("the sandbox runner could not start: {}", f.error)))
                }
                _ => Err(Error::Internal("unexpected first message from the runner".into())),
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Unavailable("the sandbox runner did not start within 20 s".into()));
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll runner start-up", e));
        }
        if n == 0 {
            continue;
        }
        // SAFETY: reading into a local buffer from our socket.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            return Err(Error::Unavailable(
                "the sandbox runner exited during start-up (its stderr says why)".into(),
            ));
        }
        decoder.extend(&buf[..r as usize]);
    }
}

/// A pidfd of the runner (`pid`, our child) if `pidfd_getfd` on it is allowed:
/// probed with an fd number that cannot be open, which fails with EBADF when the
/// access check passed (EPERM when it did not).
fn runner_pidfd(pid: u32) -> Option<Arc<OwnedFd>> {
    // SAFETY: pidfd_open on our own child; returns a fresh fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as RawFd;
    if fd < 0 {
        tracing::info!(error = %io::Error::last_os_error(), "no pidfd for the runner: worker channels travel in control messages");
        return None;
    }
    // SAFETY: fresh fd owned by us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: pidfd_getfd with a valid pidfd, an fd number no process can have open
    // (above any RLIMIT_NOFILE) and no flags; a success would return a fresh fd.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), i32::MAX, 0) } as RawFd;
    let err = io::Error::last_os_error();
    if got >= 0 {
        // SAFETY: a fresh fd from pidfd_getfd, owned by us.
        drop(unsafe { OwnedFd::from_raw_fd(got) });
    } else if err.raw_os_error() != Some(libc::EBADF) {
        tracing::info!(error = %err, "pidfd_getfd on the runner is refused: worker channels travel in control messages");
        return None;
    }
    Some(Arc::new(pidfd))
}
