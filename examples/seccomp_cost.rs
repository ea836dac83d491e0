//! What attaching a seccomp filter costs on this machine, per filter of the
//! `untrusted` level (BENCHMARKS.md, "Seccomp attach cost").
//!
//! Each sample forks a child that sets no_new_privs, optionally attaches a first
//! filter (as the runner's envelope is inherited by a worker), then times one
//! `seccomp(SECCOMP_SET_MODE_FILTER)` of the filter under test and reports it over a
//! pipe. `cargo run --release --example seccomp_cost [samples]`.

use std::time::Instant;

use roma_byob::sandbox::{policy, seccomp};

fn measure(name: &str, first: Option<&seccomp::Program>, second: &seccomp::Program, samples: usize) {
    let first = first.map(|p| p.as_fprog());
    let second_fprog = second.as_fprog();
    let mut total = 0.0;
    for _ in 0..samples {
        let mut pipe = [0; 2];
        // SAFETY: pipe fills the two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: the child only makes raw syscalls on data prepared before the fork
        // and leaves with _exit; this program has no other threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: as above; the fprogs point at programs alive in the child.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if let Some(f) = &first {
                    seccomp::install_raw(f);
                }
                let start = Instant::now();
                let rc = seccomp::install_raw(&second_fprog);
                let us = if rc == 0 { start.elapsed().as_secs_f64() * 1e6 } else { -1.0 };
                libc::write(pipe[1], (&us as *const f64).cast(), 8);
                libc::_exit(0)
            }
        }
        let mut us = 0f64;
        // SAFETY: reading 8 bytes into a local f64, reaping our child, closing our fds.
        unsafe {
            libc::read(pipe[0], (&mut us as *mut f64).cast(), 8);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        assert!(us >= 0.0, "{name}: seccomp() failed in the child");
        total += us;
    }
    println!("{name}: {} instructions, mean {:.1} µs per attach ({samples} samples)", second.len(), total / samples as f64);
}

fn main() {
    let samples = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let allowlist = policy::untrusted_worker_allowlist().compile().expect("allowlist");
    let envelope = policy::untrusted_runner_envelope().compile().expect("envelope");
    let gate = policy::untrusted_worker_gate(0x9e37_79b9_7f4a_7c15).compile().expect("gate");
    let mut one_rule = seccomp::Filter::new(seccomp::Action::Allow);
    one_rule.rule(libc::SYS_kill, seccomp::Action::Errno(libc::EPERM as u16));
    let one_rule = one_rule.compile().expect("one rule");
    measure("allowlist alone (the first session's per-worker filter)", None, &allowlist, samples);
    measure("gate on the envelope (once per runner connection thread; each worker inherits it)", Some(&envelope), &gate, samples);
    measure("one-rule filter on the envelope", Some(&envelope), &one_rule, samples);
}
