//! Engine threads are pinned to the configured cores (read back from /proc) and the
//! sandbox to `runner_cores`. Alone in its binary: it counts this process's threads.

mod common;

use common::*;
use roma_byob::{Config, Engine};


/// (thread name, allowed cpus) of this process's engine threads.
fn ring_threads() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if comm.starts_with("roma-ring-") {
            out.push((comm, cpus_allowed(&format!("{}/status", task.path().display()))));
        }
    }
    out.sort();
    out
}

#[test]
fn engine_threads_and_sandbox_are_pinned_as_configured() {
    let cores: Vec<usize> = {
        let s = cpus_allowed("/proc/self/status");
        // "0-1" or "0" on these machines; take the last core for the sandbox.
        let last = s.rsplit(['-', ',']).next().unwrap().parse::<usize>().unwrap();
        (0..=last).collect()
    };
    let ring_core = cores[0];
    let sandbox_core = *cores.last().unwrap();
    for mode in modes() {
        let e = Engine::new(Config {
            mode,
            cores: vec![ring_core],
            runner_cores: vec![sandbox_core],
            ..Default::default()
        })
        .unwrap();
        let t = load(&e, "hello_world", 1);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
        let threads = ring_threads();
        assert_eq!(threads, vec![("roma-ring-0".to_string(), ring_core.to_string())], "{mode:?}");
        let sandbox = cpus_allowed(&format!("/proc/{}/status", e.sandbox_pid()));
        assert_eq!(sandbox, sandbox_core.to_string(), "{mode:?}: sandbox affinity");
        drop(e);
        assert!(ring_threads().is_empty(), "engine threads exit at shutdown");
    }
    let err = Engine::new(Config { cores: vec![4096], ..Default::default() }).err().unwrap();
    assert_eq!(err.code(), roma_byob::Code::InvalidArgument, "{err}");
}

