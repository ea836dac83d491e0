//! `minimal` mode: at level `untrusted` workers inherit their seccomp filters from
//! the runner connection thread that cloned them and load none of their own (see
//! `roma_byob::sandbox::gate`); read back from /proc on the host.

mod common;

use common::*;
use roma_byob::{Config, Engine, SyscallFilter};

/// `Seccomp_filters` of a /proc status file, or `None` when it is gone.
fn filters(status_path: &str) -> Option<u32> {
    let status = std::fs::read_to_string(status_path).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Seccomp_filters:")).and_then(|v| v.trim().parse().ok())
}

#[test]
fn workers_inherit_the_connection_threads_filters_and_load_none() {
    // (level, filters on the runner's main thread, on a connection thread, on a worker)
    for (level, main, conn, worker) in [(SyscallFilter::Untrusted, 1, 2, 2), (SyscallFilter::WorkerEngine, 1, 1, 1)] {
        let e = Engine::new(Config { mode: roma_byob::Mode::Minimal, syscall_filter: level, ..Default::default() }).unwrap();
        let t = load(&e, "hello_world", 4);
        for _ in 0..4 {
            assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
        }
        let threads = runner_threads(e.sandbox_pid(), 4, filters);
        eprintln!("{level:?}: {threads:?}");
        let conns: Vec<_> = threads.iter().filter(|(name, _, _)| name.starts_with("conn-")).collect();
        assert!(!conns.is_empty(), "no connection thread: {threads:?}");
        for (name, own, workers) in &threads {
            let want = if name.starts_with("conn-") { conn } else { main };
            assert_eq!(*own, Some(want), "{level:?}: filters on runner thread {name}");
            assert!(workers.iter().all(|w| *w == worker), "{level:?}: filters on {name}'s workers: {workers:?}");
        }
        let total: usize = conns.iter().map(|(_, _, w)| w.len()).sum();
        assert!(total >= 1, "no worker found under the runner threads: {threads:?}");
    }
}
