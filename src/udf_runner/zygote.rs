//! Zygote start (opt-in per load, [`crate::LoadOptions::zygote`]; every mode):
//! workers forked from a pre-`main` template of the UDF instead of exec'd one by
//! one.
//!
//! A dynamically linked glibc UDF spends most of its start-up in the dynamic
//! loader and glibc's own initialisation (CPUID traps in this VM: DESIGN §4).
//! With a zygote, the runner execs the binary once as a *template*, with
//! `LD_PRELOAD` naming the shim (`zygote_shim.c`, written into the read-only root
//! at [`SHIM_PATH`]). The loader maps and relocates the binary and its libraries
//! and runs the libraries' constructors; then the shim's constructor takes over
//! and never returns in the template: for each spawn order it clones a child in
//! fresh user, PID and UTS (and, as for exec'd workers, IPC) namespaces; in
//! minimal mode with `CLONE_PARENT`, so the child is this runner's, reaped and
//! reported as any worker (gVisor: below). The child places its descriptors,
//! sets its death signal (minimal mode), drops
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
//! In gVisor (runsc 0.0~20221219) `clone` ignores `CLONE_PARENT`: the child is
//! the template's, so the runner is never sent its SIGCHLD and cannot `wait4` for
//! it (seen in the runsc debug log: each was reaped only at shutdown; gVisor's
//! `Task.Clone` makes the caller the parent of every non-thread child). There the
//! runner sets [`Setup::reap`]: the template clones plain children, reaps them
//! itself (a signalfd for SIGCHLD beside its control socket) and reports each
//! exit on its control socket, after that child's fork report; the connection
//! thread turns those into exit reports as the reaper does for its own children
//! ([`Zygote::take_reports`]). Such a child gets no parent-death signal: when its
//! template exits (unload), it passes to the sandbox's init, the runner, which
//! reaps it; the runner's own death ends the whole sandbox. A retiring template
//! is sent a stop order and drained to its end of file
//! ([`Zygote::finish`]), so no exit it reaped goes unreported.

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
/// An order without descriptors that makes a reaping template exit.
const FLAG_STOP: u8 = 0x80;
const OPT_REAP: u64 = 1;
const REPORT_FORKED: i32 = 1;
const REPORT_EXITED: i32 = 2;
/// Bytes of one template report (the shim's `struct report`).
const REPORT_LEN: usize = 12;
/// How long a retiring template may take to reach its end of file before it is
/// killed ([`Zygote::finish`]).
const FINISH_GRACE_MS: libc::c_int = 1000;

/// What a template needs once (the shim's `struct setup`).
pub struct Setup {
    /// The seccomp gate's key (0: no gate).
    pub key: u64,
    /// Namespace flags beyond user/PID/UTS for every worker.
    pub clone_flags: u64,
    /// RLIMIT_FSIZE for workers whose output is captured.
    pub log_fsize: u64,
    /// The template reaps its workers and reports their exits (gVisor, where
    /// `CLONE_PARENT` is ignored; see the module documentation).
    pub reap: bool,
}

/// One exit a reaping template reported: (pid, wait status).
pub type Exit = (libc::pid_t, i32);

/// A running template and the runner's end of its control socket.
pub struct Zygote {
    pid: libc::pid_t,
    ctl: OwnedFd,
    /// Whether its workers get `argv[2]` = "4" (shared memory): fixed per template.
    shm: bool,
    /// It reaps its own workers ([`Setup::reap`]).
    reap: bool,
    /// Bytes of a report not yet whole.
    partial: Vec<u8>,
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
        let (ctl, theirs) = super::make_channel()?;
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
        Ok(Zygote { pid, ctl, shm, reap: false, partial: Vec::new() })
    }

    /// Sends the template its set-up (once, first).
    pub fn send_setup(&mut self, setup: &Setup) -> io::Result<()> {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&setup.key.to_ne_bytes());
        bytes[8..16].copy_from_slice(&setup.clone_flags.to_ne_bytes());
        bytes[16..24].copy_from_slice(&setup.log_fsize.to_ne_bytes());
        bytes[24..].copy_from_slice(&(if setup.reap { OPT_REAP } else { 0 }).to_ne_bytes());
        self.reap = setup.reap;
        fdpass::send_with_fds(self.ctl.as_raw_fd(), &bytes, &[])
            .map_err(|e| io::Error::new(e.kind(), format!("zygote set-up: {e}")))
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn shm(&self) -> bool {
        self.shm
    }

    /// Whether it reaps its own workers ([`Setup::reap`]).
    pub fn reaps(&self) -> bool {
        self.reap
    }

    /// Its control socket, to wait on for [`Zygote::take_reports`].
    pub fn ctl_fd(&self) -> RawFd {
        self.ctl.as_raw_fd()
    }

    /// Has the template fork one worker on `channel` (with `logs` as its stdout and
    /// stderr, and `shm` at fd 4); returns the worker's pid (in the runner's PID
    /// namespace: the template lives in it). Exits reported meanwhile go to
    /// `exited`.
    pub fn fork(
        &mut self,
        channel: RawFd,
        logs: Option<(RawFd, RawFd)>,
        shm: Option<RawFd>,
        exited: &mut Vec<Exit>,
    ) -> io::Result<libc::pid_t> {
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
        let pid = loop {
            match self.next_report(true)? {
                Some((REPORT_FORKED, pid, _)) => break pid,
                Some((REPORT_EXITED, pid, status)) => exited.push((pid, status)),
                Some((kind, _, _)) => return Err(io::Error::other(format!("zygote report of unknown kind {kind}"))),
                None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the zygote template exited")),
            }
        };
        if pid < 0 {
            let e = io::Error::from_raw_os_error(-pid);
            return Err(io::Error::new(e.kind(), format!("zygote clone: {e}")));
        }
        Ok(pid)
    }

    /// Takes the exits a reaping template has reported, without waiting, into
    /// `exited`; false once the template has closed its end (it exited).
    pub fn take_reports(&mut self, exited: &mut Vec<Exit>) -> io::Result<bool> {
        loop {
            match self.next_report(false) {
                Ok(Some((REPORT_EXITED, pid, status))) => exited.push((pid, status)),
                Ok(Some((kind, _, _))) => return Err(io::Error::other(format!("unexpected zygote report of kind {kind}"))),
                Ok(None) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends a reaping template: sends it a stop order (it exits) and takes its
    /// reports until its socket closes, into `exited`; killed if that takes longer
    /// than `FINISH_GRACE_MS`, and drained on until its socket closes. A template
    /// that does not reap is just dropped (its socket's end of file stops it).
    pub fn finish(mut self, exited: &mut Vec<Exit>) {
        if !self.reap {
            return;
        }
        if fdpass::send_with_fds(self.ctl.as_raw_fd(), &[FLAG_STOP], &[]).is_err() {
            // Gone already: its socket holds whatever it reported.
            let _ = self.take_reports(exited);
            return;
        }
        let mut killed = false;
        loop {
            match self.take_reports(exited) {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
            let mut pfd = libc::pollfd { fd: self.ctl.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, if killed { -1 } else { FINISH_GRACE_MS }) };
            if n == 0 && !killed {
                eprintln!("roma-byob-runner: a zygote template did not stop within {FINISH_GRACE_MS} ms; killing it");
                super::kill_worker(self.pid);
                killed = true;
            }
        }
    }

    /// The next whole report: blocking, or `WouldBlock` when none is there yet
    /// (`wait` false); None at the end of file.
    fn next_report(&mut self, wait: bool) -> io::Result<Option<(i32, i32, i32)>> {
        let fd = self.ctl.as_raw_fd();
        while self.partial.len() < REPORT_LEN {
            if !wait {
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd; no waiting.
                if unsafe { libc::poll(&mut pfd, 1, 0) } == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
            let mut buf = [0u8; REPORT_LEN * 16];
            // SAFETY: reading into a local buffer of the given length (readable, or
            // a blocking read is wanted).
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("zygote report: {e}")));
            }
            if n == 0 {
                return Ok(None);
            }
            self.partial.extend_from_slice(&buf[..n as usize]);
        }
        let field = |i: usize| i32::from_ne_bytes(self.partial[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        let report = (field(0), field(1), field(2));
        self.partial.drain(..REPORT_LEN);
        Ok(Some(report))
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
