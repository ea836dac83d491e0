//! The worker spawn path (DESIGN §4, fast recipe): one
//! `clone(CLONE_VM | CLONE_VFORK | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS)` (plus
//! `CLONE_NEWIPC` unless the seccomp level refuses every IPC syscall, and
//! `CLONE_NEWNET` in gVisor)
//! whose child, sharing the runner's memory until it execs, sets up its fds, drops
//! every capability, sets no_new_privs and `execveat`s the binary fd. The root is
//! the runner's (already read-only), so there is no per-worker mount work, and the
//! seccomp filters are the spawning thread's, inherited (no per-worker filter
//! load): the syscalls here that workers must not make carry the gate's key
//! (`crate::sandbox::gate`). Zygote templates (`super::zygote`) start here too,
//! without the namespaces (see `SpawnPlan::template`); their workers are forked by
//! the template, not spawned here.
//!
//! The child runs on a private stack with the parent suspended (vfork semantics), so
//! it may only make raw syscalls: no allocation, no locks, no Rust std I/O.
//!
//! Descriptor tables: a child made without `CLONE_FILES` starts with a copy of the
//! runner's whole table, and its exec closes every copied fd again. The runner holds
//! a descriptor per live worker (its copy of the worker channel's host end) and per
//! channel in stock, so that cost grows with the pool (BENCHMARKS.md, ninth
//! session). With [`FdSlots`] (minimal mode), the parent first puts the fds the
//! child needs into six low-numbered slots reserved at start-up, and the child
//! shares the runner's table only until its first syscall,
//! `close_range(first_above_the_slots, ~0, CLOSE_RANGE_UNSHARE)`, which leaves it a
//! private copy of the low-numbered fds alone. The kernel copies in whole words of
//! 64 fds, so what is open between the slots and fd 64 is copied and closed again
//! by each spawn: the runner keeps its many fds (channels, binaries) at 64 and up
//! (`super::CHANNEL_FD_FLOOR`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sandbox::gate;

/// Everything the child needs, prepared by the parent before `clone`.
pub struct SpawnPlan {
    pub binary: RawFd,
    pub channel: RawFd,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub rlimit_as: Option<libc::rlimit>,
    pub rlimit_fsize: Option<libc::rlimit>,
    /// Shared-memory region, handed to the UDF as fd 4 (`argv[2]` = "4").
    pub shm: Option<RawFd>,
    /// Set: this is a zygote template (`super::zygote`): it gets `LD_PRELOAD` for
    /// the shim and stays in the runner's namespaces (its children each get their
    /// own). Not a new PID namespace: its children are made with `CLONE_PARENT`,
    /// which an init process may not use. Not a new user namespace: creating one
    /// (as each child does) needs the creator's uid mapped in its own, and a fresh
    /// namespace has no mapping. It still drops every capability and sets
    /// no_new_privs like any worker.
    pub template: Option<Template>,
}

/// A zygote template's spawn (see [`SpawnPlan::template`]).
pub struct Template {
    /// Its workers get `argv[2]` = "4" (fd 4 of the template itself is a
    /// placeholder, `plan.shm`).
    pub shm_arg: bool,
}

/// Low-numbered fds reserved for one spawning thread (see the module docs), each
/// holding `/dev/null` between spawns: stdin, stdout, stderr, channel, shared
/// memory, binary.
pub struct FdSlots {
    slots: [OwnedFd; 6],
    devnull: RawFd,
    /// Slots holding something other than `/dev/null` (bit per slot).
    filled: std::cell::Cell<u8>,
    /// One above the highest slot: the child's private table holds the fds below.
    first_above: libc::c_int,
}

impl FdSlots {
    /// Reserves the slots: the six lowest free fd numbers from `FIRST_FREE_FD` up,
    /// each a close-on-exec duplicate of `devnull` (which must stay open as long as
    /// the slots are used). Call it before the process opens many fds.
    pub fn reserve(devnull: RawFd) -> io::Result<FdSlots> {
        let slot = || -> io::Result<OwnedFd> {
            // SAFETY: fcntl duplicating an fd we hold; the result is a fresh fd.
            let fd = unsafe { libc::fcntl(devnull, libc::F_DUPFD_CLOEXEC, FIRST_FREE_FD) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd, owned from here on.
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        };
        let slots = [slot()?, slot()?, slot()?, slot()?, slot()?, slot()?];
        let first_above = slots.iter().map(|f| f.as_raw_fd()).max().unwrap_or(FIRST_FREE_FD) + 1;
        Ok(FdSlots { slots, devnull, filled: std::cell::Cell::new(0), first_above })
    }

    fn raw(&self, i: usize) -> RawFd {
        self.slots[i].as_raw_fd()
    }

    /// Puts the plan's fds into the slots (close-on-exec in this process; stdin
    /// stays `/dev/null`). On failure the slots are cleared again.
    fn fill(&self, plan: &SpawnPlan) -> io::Result<()> {
        let stdout = (plan.stdout != self.devnull).then_some(plan.stdout);
        let stderr = (plan.stderr != self.devnull).then_some(plan.stderr);
        for (i, src) in [(3, Some(plan.channel)), (1, stdout), (2, stderr), (4, plan.shm), (5, Some(plan.binary))] {
            let Some(src) = src else { continue };
            // SAFETY: dup3 onto a slot we own; the slot's previous file is released.
            if unsafe { libc::dup3(src, self.raw(i), libc::O_CLOEXEC) } < 0 {
                let e = io::Error::last_os_error();
                self.clear(true);
                return Err(io::Error::new(e.kind(), format!("dup3 into fd slot: {e}")));
            }
            self.filled.set(self.filled.get() | 1 << i);
        }
        Ok(())
    }

    /// Back to `/dev/null`: no worker's channel, log or memory stays open here (a
    /// channel's worker end held here would keep the engine from seeing the worker's
    /// end of file). The last binary stays until the next spawn replaces it, unless
    /// `binary_too` (one `dup3` less per spawn).
    fn clear(&self, binary_too: bool) {
        let keep = if binary_too { 0 } else { 1 << 5 };
        let filled = self.filled.get();
        for i in 1..self.slots.len() {
            if filled & !keep & (1 << i) == 0 {
                continue;
            }
            // SAFETY: as in `fill`. dup3 fails only for bad fds, which these are not.
            unsafe { libc::dup3(self.devnull, self.raw(i), libc::O_CLOEXEC) };
        }
        self.filled.set(filled & keep);
    }
}

/// Shared with the child through CLONE_VM: what failed, if anything.
#[repr(C)]
struct ChildCtx {
    plan: *const SpawnPlan,
    /// Non-null: the child shares the runner's fd table and takes its fds from
    /// these slots (see `FdSlots`).
    slots: *const FdSlots,
    argv: [*const libc::c_char; 4],
    envp: [*const libc::c_char; 2],
    failed_step: libc::c_int,
    errno: libc::c_int,
}

const STEPS: [&str; 13] = [
    "none", "dup2 stdio", "dup2 channel", "close_range", "prctl(PDEATHSIG)", "setrlimit",
    "capset", "prctl(NO_NEW_PRIVS)", "unused", "execveat", "move fds", "dup2 shared memory",
    "close_range(CLOSE_RANGE_UNSHARE)",
];

/// fds the child places: 0-2 stdio, 3 channel, 4 shared memory.
const FIRST_FREE_FD: libc::c_int = 5;

const STACK_SIZE: usize = 64 * 1024;

/// Reusable spawner (owns the child stack).
pub struct Spawner {
    stack: Vec<u128>,
    /// Set: children share the fd table until they unshare its low part (minimal
    /// mode; see the module docs).
    slots: Option<FdSlots>,
    /// Namespace flags beyond user/PID/UTS (IPC unless seccomp refuses IPC; gVisor:
    /// a network namespace per worker, since the container's loopback is shared
    /// otherwise).
    extra_flags: libc::c_int,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn errno() -> libc::c_int {
    // SAFETY: reading the thread's errno location is always valid.
    unsafe { *libc::__errno_location() }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildCtx, alive until the parent resumes (vfork).
    let ctx = unsafe { &mut *(arg as *mut ChildCtx) };
    // SAFETY: plan points at the parent's SpawnPlan, alive for the same reason.
    let plan = unsafe { &*ctx.plan };
    macro_rules! step {
        ($n:expr, $e:expr) => {
            if $e < 0 {
                ctx.failed_step = $n;
                ctx.errno = errno();
                libc::_exit(127);
            }
        };
    }
    // SAFETY (whole block): raw syscalls on fds and the process's own attributes; all
    // pointers passed point into ctx/plan or to locals that outlive each call.
    unsafe {
        // SAFETY: non-null only while the parent's FdSlots is alive (it is suspended).
        let binary = if let Some(slots) = ctx.slots.as_ref() {
            // First of all: until this returns, the table is the runner's own, shared.
            // The private copy holds only the fds below the slots' end.
            let first = slots.first_above as usize;
            step!(12, gate::syscall(libc::SYS_close_range, [first, i32::MAX as usize, libc::CLOSE_RANGE_UNSHARE as usize, 0, 0]) as libc::c_int);
            // Every slot is at FIRST_FREE_FD or above: no dup2 below clobbers one.
            step!(1, libc::dup2(slots.raw(0), 0));
            step!(1, libc::dup2(slots.raw(1), 1));
            step!(1, libc::dup2(slots.raw(2), 2));
            step!(2, libc::dup2(slots.raw(3), 3));
            if plan.shm.is_some() {
                step!(11, libc::dup2(slots.raw(4), 4));
            }
            // Everything else becomes close-on-exec (the binary's slot included:
            // execveat of an ELF binary works on a close-on-exec fd).
            let keep = if plan.shm.is_some() { 5 } else { 4 };
            step!(3, gate::syscall(libc::SYS_close_range, [keep, i32::MAX as usize, libc::CLOSE_RANGE_CLOEXEC as usize, 0, 0]) as libc::c_int);
            slots.raw(5)
        } else {
            // Sources that sit on a target number would be clobbered by the dup2s below:
            // move them above the targets first (rare; costs nothing otherwise).
            let mut binary = plan.binary;
            if binary < FIRST_FREE_FD {
                binary = libc::fcntl(binary, libc::F_DUPFD_CLOEXEC, FIRST_FREE_FD);
                step!(10, binary);
            }
            let mut shm = plan.shm.unwrap_or(-1);
            if shm == 3 {
                shm = libc::fcntl(shm, libc::F_DUPFD_CLOEXEC, FIRST_FREE_FD);
                step!(10, shm);
            }
            step!(1, libc::dup2(plan.stdin, 0));
            step!(1, libc::dup2(plan.stdout, 1));
            step!(1, libc::dup2(plan.stderr, 2));
            if plan.channel == 3 {
                step!(2, libc::fcntl(3, libc::F_SETFD, 0));
            } else {
                step!(2, libc::dup2(plan.channel, 3));
            }
            // Everything above the channel becomes close-on-exec (the binary fd included:
            // execveat of an ELF binary works on a close-on-exec fd).
            // Upper bound INT_MAX, not UINT_MAX: gVisor rejects larger bounds with EINVAL.
            step!(3, gate::syscall(libc::SYS_close_range, [4, i32::MAX as usize, libc::CLOSE_RANGE_CLOEXEC as usize, 0, 0]) as libc::c_int);
            if shm == 4 {
                step!(11, libc::fcntl(4, libc::F_SETFD, 0));
            } else if shm >= 0 {
                step!(11, libc::dup2(shm, 4));
            }
            binary
        };
        let prctl = |option: libc::c_int, arg: usize| gate::syscall(libc::SYS_prctl, [option as usize, arg, 0, 0, 0]) as libc::c_int;
        let setrlimit = |resource: libc::__rlimit_resource_t, lim: &libc::rlimit| {
            let lim = lim as *const libc::rlimit as usize;
            gate::syscall(libc::SYS_prlimit64, [0, resource as usize, lim, 0, 0]) as libc::c_int
        };
        step!(4, prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize));
        if let Some(lim) = plan.rlimit_as.as_ref() {
            step!(5, setrlimit(libc::RLIMIT_AS, lim));
        }
        if let Some(lim) = plan.rlimit_fsize.as_ref() {
            step!(5, setrlimit(libc::RLIMIT_FSIZE, lim));
            // Log writes past the limit fail with EFBIG instead of killing the UDF.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
        let data = [
            CapData { effective: 0, permitted: 0, inheritable: 0 },
            CapData { effective: 0, permitted: 0, inheritable: 0 },
        ];
        let caps = [&mut header as *mut CapHeader as usize, data.as_ptr() as usize, 0, 0, 0];
        step!(6, gate::syscall(libc::SYS_capset, caps) as libc::c_int);
        step!(7, prctl(libc::PR_SET_NO_NEW_PRIVS, 1));
        libc::syscall(
            libc::SYS_execveat,
            binary,
            c"".as_ptr(),
            ctx.argv.as_ptr(),
            ctx.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        ctx.failed_step = 9;
        ctx.errno = errno();
        libc::_exit(127)
    }
}

impl Spawner {
    /// The runner drops a binary: the slot that may hold the last one spawned lets
    /// go of it (its memory is freed with the runner's own copy).
    pub fn forget_binary(&self) {
        if let Some(slots) = &self.slots {
            slots.clear(true);
        }
    }

    /// A spawner adding `extra_flags` (CLONE_NEW* only) to every worker's clone; with
    /// `slots`, children take their fds from those slots (see the module docs).
    pub fn new(extra_flags: libc::c_int, slots: Option<FdSlots>) -> Spawner {
        Spawner { stack: vec![0u128; STACK_SIZE / 16], slots, extra_flags }
    }

    /// Starts one worker and returns its pid once it has exec'd the UDF. If the
    /// child failed before exec and another thread reaped it first (the runner's
    /// reaper waits for any child), `reaped_elsewhere` gets its pid.
    pub fn spawn(&mut self, plan: &SpawnPlan, reaped_elsewhere: impl FnOnce(libc::pid_t)) -> io::Result<libc::pid_t> {
        let shm_arg = match &plan.template {
            Some(t) => t.shm_arg,
            None => plan.shm.is_some(),
        };
        let shm_arg = if shm_arg { c"4".as_ptr() } else { std::ptr::null() };
        let env = if plan.template.is_some() { super::zygote::PRELOAD_ENV.as_ptr() } else { std::ptr::null() };
        if let Some(slots) = &self.slots {
            slots.fill(plan)?;
        }
        let mut ctx = ChildCtx {
            plan,
            slots: self.slots.as_ref().map_or(std::ptr::null(), |s| s as *const FdSlots),
            argv: [c"roma-byob-udf".as_ptr(), c"3".as_ptr(), shm_arg, std::ptr::null()],
            envp: [env, std::ptr::null()],
            failed_step: 0,
            errno: 0,
        };
        let files = if self.slots.is_some() { libc::CLONE_FILES } else { 0 };
        let namespaces = if plan.template.is_some() {
            0
        } else {
            libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | self.extra_flags
        };
        let flags = libc::CLONE_VM | files | libc::CLONE_VFORK | namespaces | libc::SIGCHLD;
        // SAFETY: the stack top is within our allocation and 16-byte aligned; with
        // CLONE_VFORK the parent is suspended until the child execs or exits, so
        // `ctx` and `plan` stay valid and unaliased for the child's whole run.
        let pid = unsafe {
            let top = self.stack.as_mut_ptr().add(self.stack.len()).cast::<libc::c_void>();
            clone_keyed(flags as libc::c_ulong, top, child_main, (&mut ctx as *mut ChildCtx).cast(), gate::key())
        };
        // The child has exec'd or exited: it holds its own copies now.
        if let Some(slots) = &self.slots {
            slots.clear(false);
        }
        if pid < 0 {
            let errno = (-pid) as i32;
            let e = io::Error::from_raw_os_error(errno);
            // Seen at 12,000-15,000 namespaced spawns/s sustained for seconds
            // (BENCHMARKS.md, seventeenth session): the kernel frees an exited
            // worker's namespaces asynchronously, and their count can reach the
            // per-user limit.
            let hint = if errno == libc::ENOSPC && namespaces != 0 {
                ": the limit on user, PID or UTS namespaces (/proc/sys/user/max_user_namespaces and the like) is reached; \
                 the kernel frees exited workers' namespaces asynchronously, so a high spawn rate can outrun it: raise those limits"
            } else {
                ""
            };
            return Err(io::Error::new(e.kind(), format!("clone: {e}{hint}")));
        }
        let pid = pid as libc::pid_t;
        if ctx.failed_step != 0 {
            let mut status = 0;
            // SAFETY: reaping our own child that has already exited (wait4 carries the
            // gate's key: the connection thread's filter keeps it from workers).
            let status_ptr = &mut status as *mut libc::c_int as usize;
            if unsafe { gate::syscall(libc::SYS_wait4, [pid as usize, status_ptr, 0, 0, 0]) } < 0 {
                reaped_elsewhere(pid);
            }
            let step = STEPS.get(ctx.failed_step as usize).copied().unwrap_or("?");
            let err = io::Error::from_raw_os_error(ctx.errno);
            return Err(io::Error::new(err.kind(), format!("{step}: {err}")));
        }
        Ok(pid)
    }
}

/// `clone(2)` onto `stack_top` running `f(arg)` in the child, with `key` in the
/// sixth argument register (`r9`): the connection thread's seccomp gate lets a
/// process-creating `clone` through only with the runner's key, and glibc's
/// `clone()` wrapper leaves `r9` undefined. Returns the child's pid or `-errno`.
/// The child exits with `f`'s return value if `f` returns.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned top of memory the child may use as its
/// stack until it execs or exits, and `f` must be safe to run there with `arg`
/// (with `CLONE_VM` it shares this process's memory).
#[cfg(target_arch = "x86_64")]
unsafe fn clone_keyed(
    flags: libc::c_ulong,
    stack_top: *mut libc::c_void,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
    key: u64,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the raw clone syscall (x86_64: rdi flags, rsi stack, rdx parent_tid,
    // r10 child_tid, r8 tls, r9 unused by the kernel). In the parent only rax, rcx
    // and r11 change. The child starts on `stack_top` (16-byte aligned, so the
    // `call` leaves the ABI's alignment), clears the frame pointer, calls f(arg)
    // from the callee-saved r12/r13 that it inherited, and exits with its result;
    // it never returns into Rust code of the parent's frame.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, 60", // SYS_exit
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone => ret,
            in("rdi") flags,
            in("rsi") stack_top,
            in("rdx") 0usize,
            in("r10") 0usize,
            in("r8") 0usize,
            in("r9") key,
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}
