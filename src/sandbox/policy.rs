//! The seccomp filter levels of the sandbox.
//!
//! * `worker-engine`: the runner (the sandbox supervisor) installs
//!   [`runner_denylist`] on itself; seccomp filters are inherited across
//!   fork/clone/exec and cannot be removed, so the runner and every worker it
//!   starts are bound by it. It is a denylist (default allow) of syscalls
//!   that neither a supervisor nor a request/response program needs and that
//!   widen the kernel attack surface (mounting, module loading, ptrace, bpf,
//!   io_uring, keyrings, ...). It leaves the runner's own needs alone:
//!   `clone` with namespace flags, `execveat`, `setrlimit`/`prlimit64`,
//!   `capset`, `prctl`, `seccomp`, `kill`, `waitid`/`wait4`, `signalfd4`,
//!   `poll`, `sendmsg`/`recvmsg`.
//! * `untrusted`: every worker is bound by exactly
//!   [`untrusted_worker_allowlist`], a default-deny allowlist of what a
//!   short-lived request/response program needs (statically or dynamically
//!   linked against glibc: C, C++, Rust std; and the Python 3 and Go
//!   runtimes); everything else fails with [`DENY_ERRNO`].
//!
//!   It is installed in two layers, so that no worker loads a filter of its
//!   own (turning a filter into a kernel program costs in proportion to its
//!   length, ~13 % of all CPU when each worker installed the whole allowlist,
//!   and per-worker filters are freed at every exit, which after hours of load
//!   deadlocked the kernel's BPF JIT allocator): the runner installs
//!   [`untrusted_runner_envelope`] on itself once (the allowlist plus the
//!   [`RUNNER_EXTRA`] syscalls the runner needs, with `clone` and `prlimit64`
//!   unconditional), and each connection thread, which spawns the workers,
//!   adds [`untrusted_worker_gate`] on itself once: the allowlist's answer for
//!   everything the envelope adds, unless the syscall carries the runner's
//!   random key in its unused sixth argument (see [`super::gate`]). Workers
//!   inherit both filters. The kernel applies the most restrictive answer of
//!   stacked filters, so a worker, which never holds the key, gets the
//!   allowlist's answer for every syscall and argument (a test checks this on
//!   every syscall number). The envelope is also stricter than
//!   [`runner_denylist`], which is therefore not installed at this level.
//!
//! In every filter any ABI other than x86_64 and any x32 syscall number kill
//! the process (see [`super::seccomp`]).
//!
//! Syscall numbers are the x86_64 ones, spelled out here so that they do not
//! depend on the build host (the tests check them against `libc`).

use super::seccomp::{Action, ArgCond, Filter};

/// The errno of denied syscalls.
pub const DENY_ERRNO: u16 = libc::EPERM as u16;

const DENY: Action = Action::Errno(DENY_ERRNO);

/// Defines the x86_64 syscall numbers used below (`libc::SYS_*` names) and,
/// for tests, the list to check them against `libc`.
macro_rules! x86_64_syscalls {
    ($($name:ident = $nr:literal,)*) => {
        /// x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
        #[allow(non_upper_case_globals)]
        mod nr {
            $(pub(super) const $name: libc::c_long = $nr;)*
        }
        #[cfg(all(test, target_arch = "x86_64", target_pointer_width = "64"))]
        const CROSSCHECK: &[(&str, libc::c_long, libc::c_long)] =
            &[$((stringify!($name), nr::$name, libc::$name),)*];
    };
}

x86_64_syscalls! {
    SYS_read = 0,
    SYS_write = 1,
    SYS_open = 2,
    SYS_close = 3,
    SYS_stat = 4,
    SYS_fstat = 5,
    SYS_lstat = 6,
    SYS_poll = 7,
    SYS_lseek = 8,
    SYS_mmap = 9,
    SYS_mprotect = 10,
    SYS_munmap = 11,
    SYS_brk = 12,
    SYS_rt_sigaction = 13,
    SYS_rt_sigprocmask = 14,
    SYS_rt_sigreturn = 15,
    SYS_ioctl = 16,
    SYS_pread64 = 17,
    SYS_pwrite64 = 18,
    SYS_readv = 19,
    SYS_writev = 20,
    SYS_access = 21,
    SYS_select = 23,
    SYS_sched_yield = 24,
    SYS_mremap = 25,
    SYS_mincore = 27,
    SYS_madvise = 28,
    SYS_dup = 32,
    SYS_dup2 = 33,
    SYS_nanosleep = 35,
    SYS_getpid = 39,
    SYS_sendmsg = 46,
    SYS_recvmsg = 47,
    SYS_socketpair = 53,
    SYS_clone = 56,
    SYS_execve = 59,
    SYS_exit = 60,
    SYS_wait4 = 61,
    SYS_kill = 62,
    SYS_uname = 63,
    SYS_fcntl = 72,
    SYS_fsync = 74,
    SYS_fdatasync = 75,
    SYS_ftruncate = 77,
    SYS_getcwd = 79,
    SYS_readlink = 89,
    SYS_gettimeofday = 96,
    SYS_getrlimit = 97,
    SYS_sysinfo = 99,
    SYS_ptrace = 101,
    SYS_getuid = 102,
    SYS_syslog = 103,
    SYS_getgid = 104,
    SYS_geteuid = 107,
    SYS_getegid = 108,
    SYS_getppid = 110,
    SYS_getgroups = 115,
    SYS_getresuid = 118,
    SYS_getresgid = 120,
    SYS_capget = 125,
    SYS_capset = 126,
    SYS_sigaltstack = 131,
    SYS_uselib = 134,
    SYS_personality = 135,
    SYS_getpriority = 140,
    SYS_setpriority = 141,
    SYS_sched_getparam = 143,
    SYS_sched_setscheduler = 144,
    SYS_sched_getscheduler = 145,
    SYS_vhangup = 153,
    SYS_pivot_root = 155,
    SYS_prctl = 157,
    SYS_arch_prctl = 158,
    SYS_adjtimex = 159,
    SYS_chroot = 161,
    SYS_acct = 163,
    SYS_settimeofday = 164,
    SYS_mount = 165,
    SYS_umount2 = 166,
    SYS_swapon = 167,
    SYS_swapoff = 168,
    SYS_reboot = 169,
    SYS_iopl = 172,
    SYS_ioperm = 173,
    SYS_init_module = 175,
    SYS_delete_module = 176,
    SYS_quotactl = 179,
    SYS_nfsservctl = 180,
    SYS_gettid = 186,
    SYS_tkill = 200,
    SYS_time = 201,
    SYS_futex = 202,
    SYS_sched_setaffinity = 203,
    SYS_sched_getaffinity = 204,
    SYS_lookup_dcookie = 212,
    SYS_getdents64 = 217,
    SYS_set_tid_address = 218,
    SYS_restart_syscall = 219,
    SYS_clock_settime = 227,
    SYS_clock_gettime = 228,
    SYS_clock_getres = 229,
    SYS_clock_nanosleep = 230,
    SYS_exit_group = 231,
    SYS_epoll_wait = 232,
    SYS_epoll_ctl = 233,
    SYS_tgkill = 234,
    SYS_kexec_load = 246,
    SYS_add_key = 248,
    SYS_request_key = 249,
    SYS_keyctl = 250,
    SYS_openat = 257,
    SYS_newfstatat = 262,
    SYS_readlinkat = 267,
    SYS_faccessat = 269,
    SYS_pselect6 = 270,
    SYS_ppoll = 271,
    SYS_unshare = 272,
    SYS_set_robust_list = 273,
    SYS_get_robust_list = 274,
    SYS_epoll_pwait = 281,
    SYS_signalfd4 = 289,
    SYS_eventfd2 = 290,
    SYS_epoll_create1 = 291,
    SYS_dup3 = 292,
    SYS_pipe2 = 293,
    SYS_perf_event_open = 298,
    SYS_prlimit64 = 302,
    SYS_name_to_handle_at = 303,
    SYS_open_by_handle_at = 304,
    SYS_clock_adjtime = 305,
    SYS_setns = 308,
    SYS_getcpu = 309,
    SYS_process_vm_readv = 310,
    SYS_process_vm_writev = 311,
    SYS_kcmp = 312,
    SYS_finit_module = 313,
    SYS_seccomp = 317,
    SYS_getrandom = 318,
    SYS_memfd_create = 319,
    SYS_kexec_file_load = 320,
    SYS_bpf = 321,
    SYS_execveat = 322,
    SYS_userfaultfd = 323,
    SYS_membarrier = 324,
    SYS_statx = 332,
    SYS_rseq = 334,
    SYS_io_uring_setup = 425,
    SYS_io_uring_enter = 426,
    SYS_io_uring_register = 427,
    SYS_open_tree = 428,
    SYS_move_mount = 429,
    SYS_fsopen = 430,
    SYS_fsconfig = 431,
    SYS_fsmount = 432,
    SYS_fspick = 433,
    SYS_clone3 = 435,
    SYS_close_range = 436,
    SYS_pidfd_getfd = 438,
    SYS_faccessat2 = 439,
    SYS_mount_setattr = 442,
    SYS_quotactl_fd = 443,
}

use nr::*;

/// `personality(0xffffffff)` only reads the current persona.
const PERSONALITY_QUERY: u32 = 0xffff_ffff;

// ioctl requests (asm-generic/ioctls.h, as used on x86_64).
const TCGETS: u32 = 0x5401;
const FIONREAD: u32 = 0x541B;
const FIONCLEX: u32 = 0x5450;
const FIOCLEX: u32 = 0x5451;

// clone flags (linux/sched.h); `clone` only looks at the low 32 bits.
const CLONE_THREAD: u32 = 0x0001_0000;
const CLONE_NEWNS: u32 = 0x0002_0000;
const CLONE_NEWCGROUP: u32 = 0x0200_0000;
const CLONE_NEWUTS: u32 = 0x0400_0000;
const CLONE_NEWIPC: u32 = 0x0800_0000;
const CLONE_NEWUSER: u32 = 0x1000_0000;
const CLONE_NEWPID: u32 = 0x2000_0000;
const CLONE_NEWNET: u32 = 0x4000_0000;
const CLONE_NAMESPACES: u32 = CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET;

/// Denied (EPERM) by [`runner_denylist`]; `personality` is handled apart.
const RUNNER_DENIED: &[libc::c_long] = &[
    // mounts and filesystem views
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_fsopen,
    SYS_fsmount,
    SYS_fsconfig,
    SYS_fspick,
    SYS_move_mount,
    SYS_open_tree,
    SYS_mount_setattr,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    // namespaces after the fact (clone with namespace flags stays allowed)
    SYS_unshare,
    SYS_setns,
    // other processes' memory and descriptors
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kcmp,
    SYS_pidfd_getfd,
    // kernel code, tracing and big subsystems
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_lookup_dcookie,
    SYS_uselib,
    SYS_nfsservctl,
    // keyrings
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    // machine-wide state
    SYS_reboot,
    SYS_swapon,
    SYS_swapoff,
    SYS_acct,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_iopl,
    SYS_ioperm,
    SYS_quotactl,
    SYS_quotactl_fd,
    SYS_vhangup,
    SYS_syslog,
];

/// Level `worker-engine`: installed by the runner on itself and so inherited by all its workers. A denylist (default allow; EPERM for
/// the listed syscalls) of what a sandbox supervisor and its children never
/// need and that widens kernel attack surface: the mount API, `unshare`/
/// `setns`, `chroot`/`pivot_root`, `ptrace` and cross-process memory/fd
/// access (`process_vm_*`, `kcmp`, `pidfd_getfd`), kernel modules and kexec,
/// `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*`, keyrings, clock and
/// machine settings, swap, quotas, `iopl`/`ioperm`, `syslog`, file-handle
/// syscalls, and obsolete ones (`uselib`, `nfsservctl`, `lookup_dcookie`).
/// `personality` is allowed only as the read-only query
/// `personality(0xffffffff)`. Everything the runner needs — `clone` with
/// namespace flags, `execveat`, `setrlimit`/`prlimit64`, `capset`, `prctl`,
/// `seccomp`, `kill`, `waitid`/`wait4`, `signalfd4`, `poll`,
/// `sendmsg`/`recvmsg` — stays allowed.
pub fn runner_denylist() -> Filter {
    let mut filter = Filter::new(Action::Allow);
    filter.rules(RUNNER_DENIED, DENY).rule_if(
        SYS_personality,
        vec![ArgCond::low_eq(0, PERSONALITY_QUERY)],
        Action::Allow,
        DENY,
    );
    filter
}

/// Allowed unconditionally by [`untrusted_worker_allowlist`].
const WORKER_ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors the worker was given or opens read-only-ish
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_close,
    SYS_lseek,
    SYS_fcntl,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe2,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    // file lookup (the dynamic loader, Python's imports)
    SYS_open,
    SYS_openat,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_stat,
    SYS_lstat,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_getdents64,
    // memory
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mincore,
    SYS_brk,
    // signals (abort() needs tgkill/tkill; Go preempts with tgkill)
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_tgkill,
    SYS_tkill,
    SYS_restart_syscall,
    // identity and system information (read-only)
    SYS_getpid,
    SYS_gettid,
    SYS_getppid,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getresuid,
    SYS_getresgid,
    SYS_getgroups,
    SYS_capget,
    SYS_getrlimit,
    SYS_uname,
    SYS_sysinfo,
    SYS_getpriority,
    SYS_sched_getaffinity,
    // Read-only; glibc's sched_getcpu() falls back to it when rseq and the vDSO
    // cannot answer (inside gVisor), and the JVM refuses to start without it.
    SYS_getcpu,
    SYS_sched_getparam,
    SYS_sched_getscheduler,
    SYS_getrandom,
    // time
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
    SYS_time,
    // threads and process lifetime
    SYS_exit,
    SYS_exit_group,
    SYS_futex,
    SYS_set_tid_address,
    SYS_set_robust_list,
    SYS_get_robust_list,
    SYS_rseq,
    SYS_arch_prctl,
    SYS_sched_yield,
    SYS_membarrier,
    // waiting on descriptors; eventfd2 is needed by Go's netpoller (timers)
    SYS_poll,
    SYS_ppoll,
    SYS_select,
    SYS_pselect6,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    // the worker binary is exec'd after this filter is installed
    SYS_execve,
    SYS_execveat,
];

/// Level `untrusted`: what every worker is bound by — a default-deny allowlist
/// (default `Errno(EPERM)`), in force from the worker's `execveat` on. In
/// production it is the combination of [`untrusted_runner_envelope`]
/// (the runner's) and [`untrusted_worker_gate`] (its connection threads'),
/// both inherited by every worker; this is the reference they are tested
/// against.
///
/// Allowed: what a short-lived request/response program needs, statically or
/// dynamically linked against glibc (C, C++, Rust std), and the Python 3 and
/// Go runtimes: descriptor I/O, file lookup and opening (the dynamic loader,
/// imports), memory management, signals, read-only identity/system
/// information, time, futexes and thread setup, polling (including `eventfd2`
/// for Go's netpoller), `execve`/`execveat`. With conditions:
///
/// * `ioctl` only for `TCGETS` (isatty), `FIONREAD`, `FIOCLEX` and
///   `FIONCLEX` (the latter two do what `fcntl(F_SETFD)` does anyway; Python
///   turns a non-ENOTTY failure of them into an `OSError`); other requests
///   fail with EPERM.
/// * `prlimit64` only as a query: `new_limit` (arg 2) must be NULL, checked
///   on both 32-bit halves of the pointer.
/// * `clone` only for threads: `CLONE_THREAD` set and no namespace flag
///   (`CLONE_NEW*`); `fork`, `vfork` and process-creating `clone` fail.
/// * `clone3` fails with ENOSYS (its flags are behind a pointer, which seccomp
///   cannot inspect), so glibc and others fall back to `clone`.
///
/// Everything else fails with EPERM: sockets, `kill`, SysV IPC, namespaces,
/// mounts, `ptrace`, `fork`/`vfork`, the setuid family, filesystem changes
/// (`chmod`, `unlink`, `mkdir`, `rename`, ...), `memfd_create`, `io_uring`,
/// `bpf`, ...
pub fn untrusted_worker_allowlist() -> Filter {
    untrusted_allowlist(false)
}

/// What the runner needs beyond [`untrusted_worker_allowlist`] (besides
/// process-creating `clone` and setting limits with `prlimit64`): its control
/// connections (`sendmsg`/`recvmsg` with descriptors), the workers' channels it
/// makes in minimal mode (`socketpair`), child management
/// (`wait4` — glibc's `waitpid` —, `kill`, `signalfd4`), the worker set-up steps
/// between `clone` and `execveat` (`close_range`, `prctl`, `capset`, `seccomp`;
/// glibc's `setrlimit` is `prlimit64`), pinning its connection threads
/// (`sched_setaffinity`), lowering their priority (`setpriority`,
/// `sched_setscheduler` to SCHED_BATCH) and, in
/// gVisor mode, `memfd_create` for binary copies. None of them is allowed to
/// workers.
pub const RUNNER_EXTRA: &[libc::c_long] = &[
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_socketpair,
    SYS_wait4,
    SYS_kill,
    SYS_signalfd4,
    SYS_close_range,
    SYS_prctl,
    SYS_capset,
    SYS_seccomp,
    SYS_memfd_create,
    SYS_sched_setaffinity,
    SYS_setpriority,
    SYS_sched_setscheduler,
];

/// Level `untrusted`, installed by the runner on itself once: the worker
/// allowlist plus [`RUNNER_EXTRA`], with `clone` and `prlimit64` allowed
/// whatever their arguments. Default-deny, so the runner itself is held to
/// far less than [`runner_denylist`] allows.
pub fn untrusted_runner_envelope() -> Filter {
    untrusted_allowlist(true)
}

/// Level `untrusted`, installed once by each runner connection thread (the
/// threads that clone workers) on top of [`untrusted_runner_envelope`], and
/// inherited by every worker: default allow, and for everything the envelope
/// adds the allowlist's answer — EPERM for [`RUNNER_EXTRA`], `clone` only for
/// threads, `prlimit64` only as a query — unless the sixth argument
/// ([`super::gate::KEY_ARG`]) is `key` on all 64 bits. The runner passes its
/// key there ([`super::gate::syscall`]); a worker never sees it.
pub fn untrusted_worker_gate(key: u64) -> Filter {
    let mut filter = Filter::new(Action::Allow);
    let keyed = ArgCond::u64_eq(super::gate::KEY_ARG, key).to_vec();
    for &nr in RUNNER_EXTRA.iter().chain(&[SYS_clone, SYS_prlimit64]) {
        filter.rule_if(nr, keyed.clone(), Action::Allow, DENY);
    }
    add_thread_only_clone(&mut filter);
    add_query_only_prlimit(&mut filter);
    filter
}

fn add_thread_only_clone(filter: &mut Filter) {
    filter.rule_if(
        SYS_clone,
        vec![ArgCond::low(0, CLONE_THREAD | CLONE_NAMESPACES, CLONE_THREAD)],
        Action::Allow,
        DENY,
    );
}

fn add_query_only_prlimit(filter: &mut Filter) {
    filter.rule_if(SYS_prlimit64, ArgCond::u64_eq(2, 0).to_vec(), Action::Allow, DENY);
}

/// The allowlist; `runner` widens it into [`untrusted_runner_envelope`].
fn untrusted_allowlist(runner: bool) -> Filter {
    let mut filter = Filter::new(DENY);
    filter.rules(WORKER_ALLOWED, Action::Allow);
    for request in [TCGETS, FIONREAD, FIOCLEX, FIONCLEX] {
        filter.rule_if(SYS_ioctl, vec![ArgCond::low_eq(1, request)], Action::Allow, DENY);
    }
    if runner {
        filter.rules(RUNNER_EXTRA, Action::Allow);
        filter.rule(SYS_clone, Action::Allow).rule(SYS_prlimit64, Action::Allow);
    } else {
        add_thread_only_clone(&mut filter);
        add_query_only_prlimit(&mut filter);
    }
    filter.rule(SYS_clone3, Action::Errno(libc::ENOSYS as u16));
    filter
}

#[cfg(test)]
mod tests {
    use super::super::seccomp::testing::*;
    use super::super::seccomp::X32_SYSCALL_BIT;
    use super::*;

    const EPERM: Action = DENY;
    const ENOSYS: Action = Action::Errno(libc::ENOSYS as u16);
    /// glibc's pthread_create flags.
    const GLIBC_THREAD: u64 = 0x003d_0f00;
    /// Go's newosproc flags.
    const GO_THREAD: u64 = 0x0005_0f00;
    /// glibc's fork(): CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD.
    const GLIBC_FORK: u64 = 0x0120_0011;

    fn args(a: &[u64]) -> [u64; 6] {
        let mut out = [0; 6];
        out[..a.len()].copy_from_slice(a);
        out
    }

    #[test]
    fn policies_compile_and_match_reference() {
        for (name, filter) in [
            ("runner_denylist", runner_denylist()),
            ("untrusted_worker_allowlist", untrusted_worker_allowlist()),
            ("untrusted_runner_envelope", untrusted_runner_envelope()),
            ("untrusted_worker_gate", untrusted_worker_gate(TEST_KEY)),
        ] {
            let (program, max_steps) = assert_equivalent(&filter, 600, 24, 7);
            eprintln!(
                "{name}: {} instructions, longest lookup {max_steps} instructions",
                program.len()
            );
            assert!(program.len() < 400, "{name}: {}", program.len());
            assert!(max_steps < 40, "{name}: {max_steps}");
        }
    }

    /// What the kernel returns for two stacked filters (`first` installed
    /// first): the most restrictive action; for two errnos, the newer one's.
    fn stacked(first: Action, second: Action) -> Action {
        let rank = |a: Action| match a {
            Action::KillProcess => 2,
            Action::Errno(_) => 1,
            Action::Allow => 0,
        };
        if rank(second) >= rank(first) {
            second
        } else {
            first
        }
    }

    /// A key as the runner draws one (any value but 0 works the same).
    const TEST_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

    /// Argument vectors with the key, near misses of it (one bit off, each half
    /// right on its own) and unrelated values in the key's register.
    fn with_key_variants(sets: &[[u64; 6]]) -> Vec<[u64; 6]> {
        let k = TEST_KEY;
        let variants = [k, k ^ 1, k ^ (1 << 63), k & 0xffff_ffff, k & !0xffff_ffff, k.rotate_right(32)];
        let mut out = sets.to_vec();
        for set in sets {
            for v in variants {
                let mut a = *set;
                a[usize::from(super::super::gate::KEY_ARG)] = v;
                out.push(a);
            }
        }
        out
    }

    #[test]
    fn envelope_plus_gate_is_exactly_the_worker_allowlist_without_the_key() {
        let allowlist = untrusted_worker_allowlist();
        let envelope = untrusted_runner_envelope();
        let gate = untrusted_worker_gate(TEST_KEY);
        let (p_env, p_gate) = (envelope.compile().unwrap(), gate.compile().unwrap());
        let mut rng = Rng(0x5eed);
        let mut arg_sets = interesting_args(&allowlist, &mut rng, 24);
        arg_sets.extend(interesting_args(&gate, &mut rng, 24));
        let arg_sets = with_key_variants(&arg_sets);
        let key_arg = usize::from(super::super::gate::KEY_ARG);
        let edges = [X32_SYSCALL_BIT - 1, X32_SYSCALL_BIT, X32_SYSCALL_BIT | 39, u32::MAX];
        let mut keyed_checked = 0;
        for nr in (0..=600).chain(edges) {
            for args in &arg_sets {
                for arch in [super::super::seccomp::AUDIT_ARCH_X86_64, 0x4000_0003] {
                    // Without the key: the allowlist. With it: the runner's envelope.
                    let want = if args[key_arg] == TEST_KEY {
                        keyed_checked += 1;
                        envelope.evaluate(arch, nr, args)
                    } else {
                        allowlist.evaluate(arch, nr, args)
                    };
                    let reference = stacked(envelope.evaluate(arch, nr, args), gate.evaluate(arch, nr, args));
                    assert_eq!(reference, want, "reference: arch {arch:#x} nr {nr} args {args:x?}");
                    let (a, _) = simulate_steps(&p_env, arch, nr, args);
                    let (b, _) = simulate_steps(&p_gate, arch, nr, args);
                    assert_eq!(stacked(a, b), want, "compiled: arch {arch:#x} nr {nr} args {args:x?}");
                }
            }
        }
        assert!(keyed_checked > 0);
        for extra in RUNNER_EXTRA {
            assert!(!WORKER_ALLOWED.contains(extra), "{extra} is both a runner extra and allowed to workers");
        }
        // With the key, the runner's needs pass the gate; without it they do not.
        let mut keyed = [0u64; 6];
        keyed[key_arg] = TEST_KEY;
        let runner_clone = (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::SIGCHLD) as u64;
        for nr in RUNNER_EXTRA.iter().chain(&[SYS_clone, SYS_prlimit64]) {
            let mut a = keyed;
            a[0] = runner_clone;
            a[2] = 0x7ffd_0000_1000;
            assert_eq!(simulate(&p_gate, *nr as u32, &a), Action::Allow, "{nr} with the key");
            a[key_arg] = 0;
            assert_eq!(simulate(&p_gate, *nr as u32, &a), EPERM, "{nr} without the key");
        }
    }

    /// The runner skips the per-worker IPC namespace at level `untrusted` because
    /// of this.
    #[test]
    fn allowlist_refuses_every_ipc_syscall() {
        let p = untrusted_worker_allowlist().compile().unwrap();
        for nr in [
            libc::SYS_msgget,
            libc::SYS_msgsnd,
            libc::SYS_msgrcv,
            libc::SYS_msgctl,
            libc::SYS_semget,
            libc::SYS_semop,
            libc::SYS_semctl,
            libc::SYS_semtimedop,
            libc::SYS_shmget,
            libc::SYS_shmat,
            libc::SYS_shmdt,
            libc::SYS_shmctl,
            libc::SYS_mq_open,
            libc::SYS_mq_unlink,
            libc::SYS_mq_timedsend,
            libc::SYS_mq_timedreceive,
            libc::SYS_mq_notify,
            libc::SYS_mq_getsetattr,
        ] {
            assert_eq!(simulate(&p, nr as u32, &args(&[0, 0, 0])), EPERM, "{nr}");
        }
    }

    #[test]
    fn envelope_is_stricter_than_the_denylist() {
        let envelope = untrusted_runner_envelope();
        let denylist = runner_denylist();
        let mut rng = Rng(0xd0d0);
        let mut arg_sets = interesting_args(&denylist, &mut rng, 16);
        arg_sets.extend(interesting_args(&envelope, &mut rng, 16));
        for nr in 0..=600u32 {
            for args in &arg_sets {
                let arch = super::super::seccomp::AUDIT_ARCH_X86_64;
                if denylist.evaluate(arch, nr, args) != Action::Allow {
                    assert_ne!(envelope.evaluate(arch, nr, args), Action::Allow, "nr {nr} args {args:x?}");
                }
            }
        }
        // And it leaves the runner what it needs.
        let p = envelope.compile().unwrap();
        let runner_clone = (libc::CLONE_VM
            | libc::CLONE_VFORK
            | libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET
            | libc::SIGCHLD) as u64;
        assert_eq!(simulate(&p, SYS_clone as u32, &args(&[runner_clone])), Action::Allow);
        assert_eq!(simulate(&p, SYS_prlimit64 as u32, &args(&[0, 9, 0x7ffd_0000_1000, 0])), Action::Allow);
        for needed in RUNNER_EXTRA.iter().chain(&[SYS_poll, SYS_read, SYS_write, SYS_execveat, SYS_dup2, SYS_fcntl]) {
            assert_eq!(simulate(&p, *needed as u32, &args(&[1, 2, 3])), Action::Allow, "{needed}");
        }
    }

    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn syscall_numbers_match_libc() {
        for (name, ours, theirs) in CROSSCHECK {
            assert_eq!(ours, theirs, "{name}");
        }
        assert_eq!(TCGETS, libc::TCGETS as u32);
        assert_eq!(FIONREAD, libc::FIONREAD as u32);
        assert_eq!(FIOCLEX, libc::FIOCLEX as u32);
        assert_eq!(FIONCLEX, libc::FIONCLEX as u32);
        assert_eq!(CLONE_THREAD, libc::CLONE_THREAD as u32);
        let ns = libc::CLONE_NEWNS
            | libc::CLONE_NEWCGROUP
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET;
        assert_eq!(CLONE_NAMESPACES, ns as u32);
    }

    #[test]
    fn allowlist_decisions() {
        let p = untrusted_worker_allowlist().compile().unwrap();
        let nr = |n: libc::c_long| n as u32;
        for n in WORKER_ALLOWED {
            assert_eq!(simulate(&p, nr(*n), &args(&[])), Action::Allow, "{n}");
        }
        assert_eq!(
            simulate(&p, nr(SYS_write), &args(&[1, 0x1000, 5])),
            Action::Allow
        );
        for denied in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_msgget,
            libc::SYS_shmget,
            libc::SYS_semget,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_mount,
            libc::SYS_ptrace,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_setuid,
            libc::SYS_chmod,
            libc::SYS_unlink,
            libc::SYS_mkdir,
            libc::SYS_rename,
            libc::SYS_memfd_create,
            libc::SYS_io_uring_setup,
            libc::SYS_bpf,
            libc::SYS_seccomp,
            libc::SYS_prctl,
            libc::SYS_setrlimit,
            libc::SYS_personality,
            libc::SYS_mlock,
        ] {
            assert_eq!(simulate(&p, nr(denied), &args(&[])), EPERM, "{denied}");
        }
        // clone: threads only.
        let clone = nr(SYS_clone);
        assert_eq!(simulate(&p, clone, &args(&[GLIBC_THREAD])), Action::Allow);
        assert_eq!(simulate(&p, clone, &args(&[GO_THREAD])), Action::Allow);
        assert_eq!(simulate(&p, clone, &args(&[GLIBC_FORK])), EPERM);
        assert_eq!(
            simulate(&p, clone, &args(&[u64::from(libc::SIGCHLD as u32)])),
            EPERM
        );
        assert_eq!(simulate(&p, clone, &args(&[0x4111])), EPERM); // vfork-style
        for ns in [
            CLONE_NEWUSER,
            CLONE_NEWNS,
            CLONE_NEWPID,
            CLONE_NEWNET,
            CLONE_NEWUTS,
            CLONE_NEWIPC,
            CLONE_NEWCGROUP,
        ] {
            assert_eq!(
                simulate(&p, clone, &args(&[GLIBC_THREAD | u64::from(ns)])),
                EPERM,
                "{ns:#x}"
            );
        }
        assert_eq!(simulate(&p, nr(SYS_clone3), &args(&[0x1234, 88])), ENOSYS);
        // ioctl: only the listed requests; the kernel ignores the high half.
        let ioctl = nr(SYS_ioctl);
        for request in [TCGETS, FIONREAD, FIOCLEX, FIONCLEX] {
            assert_eq!(
                simulate(&p, ioctl, &args(&[0, u64::from(request)])),
                Action::Allow
            );
            assert_eq!(
                simulate(
                    &p,
                    ioctl,
                    &args(&[0, 0xffff_0000_0000_0000 | u64::from(request)])
                ),
                Action::Allow
            );
        }
        for request in [
            0x5412u64, /* TIOCSTI */
            0x5402,    /* TCSETS */
            0x5413,    /* TIOCGWINSZ */
            0x541C,    /* TIOCLINUX */
            0,
        ] {
            assert_eq!(
                simulate(&p, ioctl, &args(&[0, request])),
                EPERM,
                "{request:#x}"
            );
        }
        // prlimit64: only with new_limit == NULL (both halves).
        let prlimit = nr(SYS_prlimit64);
        assert_eq!(
            simulate(&p, prlimit, &args(&[0, 7, 0, 0x7ffd_0000_1000])),
            Action::Allow
        );
        assert_eq!(
            simulate(&p, prlimit, &args(&[0, 7, 0x7ffd_0000_1000, 0])),
            EPERM
        );
        assert_eq!(
            simulate(&p, prlimit, &args(&[0, 7, 0x1_0000_0000, 0])),
            EPERM
        );
        assert_eq!(simulate(&p, prlimit, &args(&[0, 7, 0x1000, 0])), EPERM);
        // Other ABIs.
        assert_eq!(
            simulate(&p, X32_SYSCALL_BIT | nr(SYS_write), &args(&[])),
            Action::KillProcess
        );
        let (i386, _) = simulate_steps(&p, 0x4000_0003, 4, &args(&[]));
        assert_eq!(i386, Action::KillProcess);
    }

    #[test]
    fn denylist_decisions() {
        let p = runner_denylist().compile().unwrap();
        let nr = |n: libc::c_long| n as u32;
        for n in RUNNER_DENIED {
            assert_eq!(simulate(&p, nr(*n), &args(&[])), EPERM, "{n}");
        }
        let personality = nr(SYS_personality);
        assert_eq!(
            simulate(&p, personality, &args(&[0xffff_ffff])),
            Action::Allow
        );
        assert_eq!(simulate(&p, personality, &args(&[0])), EPERM);
        assert_eq!(simulate(&p, personality, &args(&[0x0040_0000])), EPERM); // READ_IMPLIES_EXEC
                                                                             // What the runner itself needs.
        let runner_clone =
            (libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
                as u64
                | libc::SIGCHLD as u64;
        assert_eq!(
            simulate(&p, nr(libc::SYS_clone), &args(&[runner_clone])),
            Action::Allow
        );
        for needed in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_setrlimit,
            libc::SYS_prlimit64,
            libc::SYS_capset,
            libc::SYS_prctl,
            libc::SYS_seccomp,
            libc::SYS_kill,
            libc::SYS_waitid,
            libc::SYS_wait4,
            libc::SYS_signalfd4,
            libc::SYS_poll,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_socket,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_exit_group,
        ] {
            assert_eq!(
                simulate(&p, nr(needed), &args(&[1, 2, 3])),
                Action::Allow,
                "{needed}"
            );
        }
        assert_eq!(
            simulate(&p, X32_SYSCALL_BIT | nr(SYS_mount), &args(&[])),
            Action::KillProcess
        );
    }

    extern "C" fn thread_main(arg: *mut libc::c_void) -> *mut libc::c_void {
        arg
    }

    /// Real kernel: the allowlist in a forked child.
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn kernel_enforces_worker_allowlist() {
        let allowlist = untrusted_worker_allowlist().compile().unwrap();
        let envelope = untrusted_runner_envelope().compile().unwrap();
        let gate = untrusted_worker_gate(TEST_KEY).compile().unwrap();
        // The reference allowlist alone, and the production stack (the syscalls
        // below carry no key).
        kernel_enforces(&[allowlist.as_fprog()]);
        kernel_enforces(&[envelope.as_fprog(), gate.as_fprog()]);
    }

    /// Real kernel: behind the gate, the runner's syscalls work with the key and
    /// fail without it, or with a near miss of it.
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn kernel_lets_only_keyed_syscalls_through_the_gate() {
        use super::super::gate;
        let envelope = untrusted_runner_envelope().compile().unwrap();
        let gate_prog = untrusted_worker_gate(TEST_KEY).compile().unwrap();
        let (e, g) = (envelope.as_fprog(), gate_prog.as_fprog());
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let end = in_child(|| {
            if !no_new_privs() {
                return 10;
            }
            // SAFETY: installing compiled programs kept alive by the caller; plain
            // syscalls with integer arguments (kill with signal 0 only checks).
            unsafe {
                if super::super::seccomp::install_raw(&e) != 0 || super::super::seccomp::install_raw(&g) != 0 {
                    return 11;
                }
                let me = libc::getpid() as usize;
                for wrong in [0, TEST_KEY ^ 1, TEST_KEY & 0xffff_ffff, TEST_KEY & !0xffff_ffff] {
                    if libc::syscall(libc::SYS_kill, me, 0, 0, 0, 0, wrong) != -1 || errno() != libc::EPERM {
                        return 12;
                    }
                }
                // This child is a copy of the test process: setting the key here
                // changes nothing for the other tests.
                gate::set_key(TEST_KEY);
                if gate::syscall(libc::SYS_kill, [me, 0, 0, 0, 0]) != 0 {
                    return 13;
                }
                let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                    return 14;
                }
                let rl_ptr = &rl as *const libc::rlimit as usize;
                if gate::syscall(libc::SYS_prlimit64, [0, libc::RLIMIT_NOFILE as usize, rl_ptr, 0, 0]) != 0 {
                    return 15;
                }
                if libc::write(fds[1], b"ok".as_ptr().cast(), 2) != 2 {
                    return 16;
                }
            }
            0
        });
        expect_ok_from_child(end, fds);
    }

    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    fn kernel_enforces(filters: &[libc::sock_fprog]) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let end = in_child(|| {
            if !no_new_privs() {
                return 10;
            }
            for fprog in filters {
                // SAFETY: `fprog` describes a compiled program the caller keeps alive.
                if unsafe { super::super::seccomp::install_raw(fprog) } != 0 {
                    return 11;
                }
            }
            // SAFETY: plain syscalls with valid (or deliberately bogus but
            // harmless) arguments; a clone that unexpectedly succeeds exits.
            unsafe {
                if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) != -1 || errno() != libc::EPERM
                {
                    return 12;
                }
                if libc::kill(libc::getpid(), 0) != -1 || errno() != libc::EPERM {
                    return 13;
                }
                if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                    return 14;
                }
                let rc = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                if rc == 0 {
                    libc::_exit(0);
                }
                if rc != -1 || errno() != libc::EPERM {
                    return 15;
                }
                if libc::syscall(libc::SYS_clone3, 0, 0) != -1 || errno() != libc::ENOSYS {
                    return 16;
                }
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                    return 17;
                }
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != -1 || errno() != libc::EPERM {
                    return 18;
                }
                // A thread: glibc tries clone3 (ENOSYS), then clone.
                let mut thread: libc::pthread_t = 0;
                if libc::pthread_create(
                    &mut thread,
                    std::ptr::null(),
                    thread_main,
                    std::ptr::null_mut(),
                ) != 0
                {
                    return 19;
                }
                if libc::pthread_join(thread, std::ptr::null_mut()) != 0 {
                    return 20;
                }
                if libc::write(fds[1], b"ok".as_ptr().cast(), 2) != 2 {
                    return 21;
                }
            }
            0
        });
        expect_ok_from_child(end, fds);
    }

    /// Real kernel: both levels stacked as in production, then exec real
    /// programs (dynamic glibc binaries, Python 3 if present).
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    #[test]
    fn kernel_runs_real_programs_under_both_levels() {
        use std::ffi::CString;
        let denylist = runner_denylist().compile().unwrap();
        let envelope = untrusted_runner_envelope().compile().unwrap();
        let gate = untrusted_worker_gate(TEST_KEY).compile().unwrap();
        // (runner's filter, connection thread's filter): level worker-engine,
        // level untrusted.
        let levels = [
            (denylist.as_fprog(), None),
            (envelope.as_fprog(), Some(gate.as_fprog())),
        ];
        let script = "import json, os, sys, hashlib, re, threading\n\
                      t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
                      print(json.dumps({'pid': os.getpid(), 'h': hashlib.sha256(b'x').hexdigest()}))\n\
                      print(sys.stdin.isatty(), os.cpu_count())";
        let commands: &[&[&str]] = &[
            &["/usr/bin/true"],
            &["/bin/sh", "-c", "echo hi; read x < /dev/null; exit 0"],
            &["/usr/bin/ls", "-la", "/"],
            &["/usr/bin/python3", "-c", script],
        ];
        let devnull = CString::new("/dev/null").unwrap();
        for ((runner, worker), command) in levels.iter().flat_map(|l| commands.iter().map(move |c| (l, c))) {
            if !std::path::Path::new(command[0]).exists() {
                eprintln!("skipping {}: not installed", command[0]);
                continue;
            }
            let owned: Vec<CString> = command.iter().map(|a| CString::new(*a).unwrap()).collect();
            let mut argv: Vec<*const libc::c_char> = owned.iter().map(|a| a.as_ptr()).collect();
            argv.push(std::ptr::null());
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            let end = in_child(|| {
                // SAFETY: raw libc calls with pointers prepared before fork.
                unsafe {
                    let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
                    if null < 0 || libc::dup2(null, 1) != 1 || libc::dup2(null, 2) != 2 {
                        return 30;
                    }
                    if !no_new_privs() {
                        return 31;
                    }
                    if super::super::seccomp::install_raw(runner) != 0 {
                        return 32;
                    }
                    // What the runner's filter must deny.
                    if libc::personality(0) != -1 {
                        return 33;
                    }
                    if let Some(worker) = worker {
                        if super::super::seccomp::install_raw(worker) != 0 {
                            return 34;
                        }
                    }
                    libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                    35
                }
            });
            assert_eq!(end, ChildEnd::Exited(0), "{command:?}");
        }
    }
}
