//! Starting the runner process for a mode and waiting for its start-up report.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;

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

/// A started runner: the process and the host ends of its control connections.
pub struct Launched {
    pub child: Child,
    pub controls: Vec<OwnedFd>,
    pub warnings: Vec<String>,
}

/// Starts the runner for `config` with `shards` control connections and waits until
/// it reports that its sandbox is set up.
pub fn launch(config: &Config, runner: &Path, shards: usize) -> Result<Launched> {
    if config.mode != Mode::Minimal {
        return Err(Error::FailedPrecondition(format!(
            "mode {} is not available in this build; use Mode::Minimal",
            config.mode.as_str()
        )));
    }
    let mut host_ends = Vec::new();
    let mut runner_ends = Vec::new();
    for _ in 0..shards {
        let (h, r) = crate::ipc::fdpass::stream_pair().map_err(|e| Error::io("socketpair", e))?;
        host_ends.push(h);
        runner_ends.push(r);
    }
    let args = RunnerArgs {
        mode: config.mode.as_str().to_string(),
        filter: config.syscall_filter.as_str().to_string(),
        lib_mounts: config.lib_mounts.clone(),
        control_fds: (0..shards as RawFd).map(|i| FIRST_CONTROL_FD + i).collect(),
        rlimit_as: config.memory_limit.map(|m| (m.soft_bytes, m.hard_bytes)),
        max_log_bytes: config.max_log_bytes,
        scratch: PathBuf::from("/tmp"),
    };
    let raw_ends: Vec<RawFd> = runner_ends.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(runner);
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
            libc::syscall(libc::SYS_close_range, first_free, u32::MAX, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::io(&format!("start {}", runner.display()), e))?;
    drop(runner_ends);
    let mut launched = Launched { child, controls: host_ends, warnings: Vec::new() };
    let deadline = Instant::now() + START_TIMEOUT;
    for i in 0..shards {
        match wait_started(&launched.controls[i], deadline) {
            Ok(w) => {
                if i == 0 {
                    launched.warnings = w;
                }
            }
            Err(e) => {
                let _ = launched.child.kill();
                let _ = launched.child.wait();
                return Err(e);
            }
        }
    }
    Ok(launched)
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
