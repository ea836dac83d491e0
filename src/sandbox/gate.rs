//! Keyed syscalls: how the runner's spawning threads keep the syscalls workers
//! must not make, while every worker inherits its filter instead of loading one.
//!
//! At level `untrusted` each runner connection thread installs
//! [`super::policy::untrusted_worker_gate`] on itself once, on top of the
//! process-wide envelope. That filter lets the runner's extra syscalls through
//! only when the otherwise unused sixth argument register (`r9`, `args[5]`)
//! holds a 64-bit key drawn from the kernel's random pool when the runner
//! starts; any other value gets the worker allowlist's answer. Workers are
//! cloned from that thread, so they inherit the filter: no worker loads (and,
//! at exit, frees) a BPF program of its own. Per-worker filter churn was both
//! a cost (~25-30 µs of kernel work per spawn) and, after hours of load, the
//! trigger of a kernel deadlock in the BPF JIT allocator (BENCHMARKS.md).
//!
//! The key never reaches a worker: `execveat` replaces the address space and
//! clears the registers, the worker cannot read the runner's memory (no
//! `ptrace`, `process_vm_readv` or other process's `/proc` under the allowlist,
//! and it runs in its own PID and user namespace) nor the filter itself
//! (`PTRACE_SECCOMP_GET_FILTER` needs `CAP_SYS_ADMIN` and `ptrace`). Guessing it
//! succeeds with probability 2^-64 per syscall.
//!
//! Every syscall that the gate keeps from workers and that the runner's
//! connection threads make goes through [`syscall`], which passes the key. On the
//! host (no key set) and on threads without the gate the key is 0 and ignored.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The syscall argument that carries the key (`r9` on x86_64); no syscall the
/// gate guards has six arguments.
pub const KEY_ARG: u8 = 5;

static KEY: AtomicU64 = AtomicU64::new(0);

/// A fresh key from the kernel's random pool (never 0, the "no key" value).
pub fn random_key() -> io::Result<u64> {
    loop {
        let mut key = 0u64;
        // SAFETY: getrandom writes at most 8 bytes into the local.
        let n = unsafe { libc::getrandom((&mut key as *mut u64).cast(), 8, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 8 && key != 0 {
            return Ok(key);
        }
    }
}

/// Sets the key [`syscall`] passes (the runner, once, before its threads start).
pub fn set_key(key: u64) {
    KEY.store(key, Ordering::Relaxed);
}

/// The key [`syscall`] passes (0 when none was set).
pub fn key() -> u64 {
    KEY.load(Ordering::Relaxed)
}

/// A raw syscall of up to five arguments with the key in the sixth. Returns the
/// kernel's result; on failure -1 with `errno` set (as `libc::syscall`). Safe to
/// call in a `CLONE_VM | CLONE_VFORK` child: no allocation, no locks.
///
/// # Safety
/// As for `libc::syscall`: the arguments must be valid for syscall `nr`.
pub unsafe fn syscall(nr: libc::c_long, a: [usize; 5]) -> libc::c_long {
    // SAFETY: forwarded to the caller; glibc's syscall() takes the sixth argument
    // from the stack into r9.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], key()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_nonzero() {
        let (a, b) = (random_key().unwrap(), random_key().unwrap());
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
