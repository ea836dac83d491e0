//! `gvisor` / `gvisor-debug` modes: an OCI bundle whose root is the read-only worker
//! root, run with Debian's `runsc` (ptrace platform) in a private state directory.
//!
//! Facts this module is built on (DESIGN §4, re-measured on runsc 0.0~20221219):
//! runsc cannot pass extra fds to the container, so the runner's first control
//! connection is its stdin (a socketpair end) and the others are sent over it;
//! `MS_REC`, remount and `pivot_root` fail inside, so the container root itself is
//! the worker root (OCI `ro` mounts); without explicit read-only `/dev` and `/tmp`
//! mounts gVisor adds writable ones; `--network=none` is required as root.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::{Config, Error, Mode, Result};

/// Oldest runsc build known to work (Debian's 0.0~20221219).
const MIN_RUNSC_DATE: u32 = 20221219;
const RUNNER_IN_SANDBOX: &str = "/roma-byob-runner";

/// Where a gVisor engine keeps its state. Removed on shutdown (debug logs excepted).
pub struct GvisorState {
    pub runsc: PathBuf,
    /// Private directory: `root/` (runsc --root), `bundle/`, runner logs.
    pub dir: PathBuf,
    pub debug_logs: Option<PathBuf>,
    next_container: u64,
}

fn install_hint() -> &'static str {
    "install gVisor with `apt-get install -y runsc` (or set Config::runsc_path), or use Mode::Minimal"
}

/// Finds runsc and checks its version.
pub fn find_runsc(config: &Config) -> Result<PathBuf> {
    let path = match &config.runsc_path {
        Some(p) => p.clone(),
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join("runsc")).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain([PathBuf::from("/usr/bin/runsc"), PathBuf::from("/usr/local/bin/runsc")])
            .find(|p| p.is_file())
            .ok_or_else(|| Error::FailedPrecondition(format!("runsc (gVisor) is not installed: {}", install_hint())))?,
    };
    let out = Command::new(&path).arg("--version").output().map_err(|e| {
        Error::FailedPrecondition(format!("cannot run {}: {e}; {}", path.display(), install_hint()))
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(Error::FailedPrecondition(format!("`{} --version` failed; {}", path.display(), install_hint())));
    }
    if let Some(date) = version_date(&text) {
        if date < MIN_RUNSC_DATE {
            return Err(Error::FailedPrecondition(format!(
                "runsc at {} is too old ({}); roma-byob needs a build from {MIN_RUNSC_DATE} or later: {}",
                path.display(),
                text.lines().next().unwrap_or(""),
                install_hint()
            )));
        }
    }
    Ok(path)
}

/// The YYYYMMDD date in a runsc version line (`runsc version 0.0~20221219.0`,
/// `runsc version release-20231009.0`).
fn version_date(text: &str) -> Option<u32> {
    let line = text.lines().next()?;
    let bytes = line.as_bytes();
    (0..bytes.len().saturating_sub(7)).find_map(|i| {
        let w = &line[i..i + 8];
        (w.bytes().all(|b| b.is_ascii_digit()) && w.starts_with("20")).then(|| w.parse().ok()).flatten()
    })
}

impl GvisorState {
    /// Creates the private state directory and the bundle.
    pub fn create(config: &Config, runner: &Path, runner_args: &[String]) -> Result<GvisorState> {
        let runsc = find_runsc(config)?;
        let dir = make_private_dir("roma-byob-gvisor")?;
        let mut state = GvisorState { runsc, dir, debug_logs: None, next_container: 0 };
        match state.populate(config, runner, runner_args) {
            Ok(()) => Ok(state),
            Err(e) => {
                state.remove();
                Err(e)
            }
        }
    }

    fn populate(&mut self, config: &Config, runner: &Path, runner_args: &[String]) -> Result<()> {
        std::fs::create_dir(self.dir.join("root")).map_err(|e| Error::io("create runsc root", e))?;
        std::fs::create_dir_all(self.dir.join("bundle/rootfs")).map_err(|e| Error::io("create bundle", e))?;
        if config.mode == Mode::GvisorDebug {
            let logs = make_private_dir("roma-byob-gvisor-debug")?;
            tracing::info!(dir = %logs.display(), "gvisor-debug: runsc --debug --strace logs are written here and kept after shutdown");
            self.debug_logs = Some(logs);
        }
        let spec = bundle_spec(config, runner, runner_args)?;
        let text = serde_json::to_vec_pretty(&spec).map_err(|e| Error::Internal(format!("OCI spec: {e}")))?;
        std::fs::write(self.dir.join("bundle/config.json"), text).map_err(|e| Error::io("write config.json", e))
    }

    /// The command that starts one sandbox, and its container id.
    pub fn command(&mut self) -> (Command, String) {
        // runsc names an abstract control socket after the container id: ids must be
        // unique across engines and processes, not just within this engine.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.next_container = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("roma-byob-{}-{}-{nanos:x}", std::process::id(), self.next_container);
        let mut cmd = Command::new(&self.runsc);
        cmd.arg("--root").arg(self.dir.join("root")).args(["--network=none", "--ignore-cgroups"]);
        if let Some(logs) = &self.debug_logs {
            let mut d = logs.as_os_str().to_owned();
            d.push("/");
            cmd.arg("--debug").arg(format!("--debug-log={}", d.to_string_lossy())).arg("--strace");
        }
        cmd.arg("run").arg("--bundle").arg(self.dir.join("bundle")).arg(&id);
        (cmd, id)
    }

    /// Path of the runner's stderr log for one container.
    pub fn runner_log(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.stderr"))
    }

    /// Forgets a container: `runsc delete --force` (its processes are already dead or
    /// are killed by it) and its log.
    pub fn delete(&self, id: &str) {
        let out = Command::new(&self.runsc)
            .arg("--root")
            .arg(self.dir.join("root"))
            .args(["delete", "--force", id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output();
        if let Ok(o) = out {
            let err = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() && !err.contains("does not exist") && !err.contains("not found") {
                tracing::debug!(container = id, "runsc delete: {}", err.trim());
            }
        }
        let _ = std::fs::remove_file(self.runner_log(id));
    }

    /// Reads the end of a container's runner log (for start-up errors).
    pub fn log_tail(&self, id: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.runner_log(id)) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Removes the state directory (debug logs are kept).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the gVisor state directory");
        }
    }
}

fn make_private_dir(prefix: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let p = base.join(format!("{prefix}-{}-{:x}{attempt}", std::process::id(), nanos));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&format!("create {}", p.display()), e)),
        }
    }
    Err(Error::Internal("cannot create a private state directory".into()))
}

fn bundle_spec(config: &Config, runner: &Path, runner_args: &[String]) -> Result<serde_json::Value> {
    let runner = std::fs::canonicalize(runner).map_err(|e| Error::io("canonicalize runner path", e))?;
    let mut args = vec![RUNNER_IN_SANDBOX.to_string()];
    args.extend(runner_args.iter().cloned());
    let mut mounts = vec![
        // Read-only /dev holding only null; read-only /tmp: otherwise gVisor adds
        // writable ones that a worker could use to pass bytes to the next.
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "noexec", "size=4k"]}),
        json!({"destination": "/dev/null", "type": "bind", "source": "/dev/null", "options": ["bind"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "noexec", "size=4k"]}),
        // gVisor mounts the container's /proc and a synthetic /sys by itself; /proc
        // would show workers each other's processes. Cover both with empty,
        // read-only tmpfs.
        json!({"destination": "/proc", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "noexec", "size=4k"]}),
        json!({"destination": "/sys", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "noexec", "size=4k"]}),
        json!({"destination": RUNNER_IN_SANDBOX, "type": "bind", "source": runner, "options": ["bind", "ro"]}),
    ];
    for lib in &config.lib_mounts {
        match std::fs::canonicalize(lib) {
            Ok(src) => mounts.push(json!({
                "destination": lib, "type": "bind", "source": src, "options": ["rbind", "ro", "nosuid", "nodev"]
            })),
            Err(e) => tracing::warn!(path = %lib.display(), error = %e, "library mount skipped"),
        }
    }
    Ok(json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "roma-byob",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_version_dates() {
        assert_eq!(version_date("runsc version 0.0~20221219.0\nspec: 1.0.2-dev"), Some(20221219));
        assert_eq!(version_date("runsc version release-20231009.0"), Some(20231009));
        assert_eq!(version_date("runsc version 0.0~20210101.0"), Some(20210101));
        assert_eq!(version_date("runsc version unknown"), None);
    }
}
