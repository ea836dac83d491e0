//! Zygote start (opt-in per load, [`crate::LoadOptions::zygote`]; minimal mode):
//! workers forked from a pre-`main` template of the UDF instead of exec'd one by
//! one.
//!
//! A dynamically linked glibc UDF spends most of its start-up in the dynamic
//! loader and glibc's own initialisation (CPUID traps in this VM: DESIGN §4).
//! With a zygote, the runner execs the binary once as a *template*, with
//! `LD_PRELOAD` naming the shim (`zygote_shim.c`, written into the read-only root
//! at [`SHIM_PATH`]). The loader maps and relocates the binary and its libraries
//! and runs the libraries' constructors; then the shim's constructor takes over
//! and never returns in the template: for each spawn order it clones a child
//! with `CLONE_PARENT` (so the child is this runner's, reaped and reported as any
//! worker) in fresh user, PID and UTS (and, as for exec'd workers, IPC)
//! namespaces. The child places its descriptors, sets its death signal, drops
//! every capability, erases the seccomp gate's key and `LD_PRELOAD`, and returns
//! into the loader, which runs the executable's own constructors and `main()`.
//!
//! What holds as for exec'd workers: one fresh process per execution; nothing
//! passes between two executions (each child is a copy-on-write copy of the
//! template, which never saw a request); the same namespaces, read-only root,
//! seccomp filters, no capabilities, no_new_privs, resource limits and
//! descriptors (0-2, the channel at 3, shared memory at 4); the environment the
//! UDF sees is the exec'd worker's (empty).
//!
//! What differs, and why it is opt-in:
//! * Every worker of one template shares its address-space layout (ASLR), stack
//!   canary and pointer guard: a UDF bug that leaks an address in one execution's
//!   response weakens exploit mitigations against later executions of the same
//!   code token. Isolation between executions is unchanged.
//! * Only binaries whose pre-`main` start-up runs no code of their own qualify
//!   (checked on the host at load, `crate::sandbox::zygote_elf`): the template holds
//!   the gate's key, so no untrusted code may run in it. Library constructors and
//!   IFUNC resolvers of the read-only root's libraries do run in it.
//! * A worker whose set-up fails before `main` exits with status 127 (exec'd
//!   workers report the failed step instead).
//!
//! Minimal mode only. Tried in gVisor (runsc 0.0~20221219), where it ran and
//! halved glibc workers' latency: the `CLONE_PARENT` children do become the
//! runner's, but the runner is never sent their SIGCHLD and its reaping thread's
//! `wait4(-1, WNOHANG)` does not see them (runsc debug log: every one was reaped
//! only when the connection thread ended, at shutdown), so each would stay a
//! zombie and a crash would not be reported.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::spawn::{SpawnPlan, Spawner, Template};
use crate::ipc::fdpass;

/// The shim, built from `zygote_shim.c` by the build script.
pub const SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/zygote_shim.so"));

/// Where the minimal-mode root holds the shim (written before the root turns
/// read-only).
pub const SHIM_PATH: &str = "/roma-zygote.so";

/// `LD_PRELOAD` for templates (`SHIM_PATH`; a test checks that they agree).
pub const PRELOAD_ENV: &std::ffi::CStr = c"LD_PRELOAD=/roma-zygote.so";

const FLAG_LOG: u8 = 1;
const FLAG_SHM: u8 = 2;

/// What a template needs once (the shim's `struct setup`).
pub struct Setup {
    /// The seccomp gate's key (0: no gate).
    pub key: u64,
    /// Namespace flags beyond user/PID/UTS for every worker.
    pub clone_flags: u64,
    /// RLIMIT_FSIZE for workers whose output is captured.
    pub log_fsize: u64,
}

/// A running template and the runner's end of its control socket.
pub struct Zygote {
    pid: libc::pid_t,
    ctl: OwnedFd,
    /// Whether its workers get `argv[2]` = "4" (shared memory): fixed per template.
    shm: bool,
}

impl Zygote {
    /// Execs `binary` as a template through `spawner` (its children get the shared
    /// memory argument when `shm`). `reaped_elsewhere` as in [`Spawner::spawn`].
    /// The template waits for [`Zygote::send_setup`] before anything else.
    pub fn start(
        spawner: &mut Spawner,
        binary: RawFd,
        devnull: RawFd,
        rlimit_as: Option<libc::rlimit>,
        shm: bool,
        reaped_elsewhere: impl FnOnce(libc::pid_t),
    ) -> io::Result<Zygote> {
        // Long-lived: kept out of the low fd numbers every spawn copies (`CHANNEL_FD_FLOOR`).
        let (ctl, theirs) = super::make_channel(true)?;
        let plan = SpawnPlan {
            binary,
            channel: theirs.as_raw_fd(),
            stdin: devnull,
            stdout: devnull,
            stderr: devnull,
            rlimit_as,
            rlimit_fsize: None,
            // The placeholder at 4 (see zygote_shim.c).
            shm: Some(devnull),
            template: Some(Template { shm_arg: shm }),
        };
        let pid = spawner.spawn(&plan, reaped_elsewhere)?;
        Ok(Zygote { pid, ctl, shm })
    }

    /// Sends the template its set-up (once, first).
    pub fn send_setup(&self, setup: &Setup) -> io::Result<()> {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&setup.key.to_ne_bytes());
        bytes[8..16].copy_from_slice(&setup.clone_flags.to_ne_bytes());
        bytes[16..].copy_from_slice(&setup.log_fsize.to_ne_bytes());
        fdpass::send_with_fds(self.ctl.as_raw_fd(), &bytes, &[])
            .map_err(|e| io::Error::new(e.kind(), format!("zygote set-up: {e}")))
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn shm(&self) -> bool {
        self.shm
    }

    /// Has the template fork one worker on `channel` (with `logs` as its stdout and
    /// stderr, and `shm` at fd 4); returns the worker's pid (in the runner's PID
    /// namespace: the template lives in it). A template that has died gives
    /// `BrokenPipe` or `ConnectionReset` if it never took the order, and
    /// `UnexpectedEof` if it did (then a child may exist).
    pub fn fork(&self, channel: RawFd, logs: Option<(RawFd, RawFd)>, shm: Option<RawFd>) -> io::Result<libc::pid_t> {
        let mut fds = [channel; 4];
        let (mut n, mut flags) = (1, 0);
        if let Some((out, err)) = logs {
            fds[1..3].copy_from_slice(&[out, err]);
            (n, flags) = (3, flags | FLAG_LOG);
        }
        if let Some(shm) = shm {
            fds[n] = shm;
            (n, flags) = (n + 1, flags | FLAG_SHM);
        }
        fdpass::send_with_fds(self.ctl.as_raw_fd(), &[flags], &fds[..n])
            .map_err(|e| io::Error::new(e.kind(), format!("zygote spawn order: {e}")))?;
        let mut reply = [0u8; 4];
        let mut got = 0;
        while got < reply.len() {
            // SAFETY: reading into the rest of a local buffer.
            let n = unsafe { libc::read(self.ctl.as_raw_fd(), reply[got..].as_mut_ptr().cast(), reply.len() - got) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("zygote reply: {e}")));
            }
            if n == 0 {
                // It had read the order: it may have cloned the child first.
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the zygote template exited"));
            }
            got += n as usize;
        }
        let pid = i32::from_ne_bytes(reply);
        if pid < 0 {
            let e = io::Error::from_raw_os_error(-pid);
            return Err(io::Error::new(e.kind(), format!("zygote clone: {e}")));
        }
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_names_the_shim_path() {
        assert_eq!(PRELOAD_ENV.to_str().unwrap(), format!("LD_PRELOAD={SHIM_PATH}"));
    }
}
