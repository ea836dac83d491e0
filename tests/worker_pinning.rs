//! `minimal` mode: each runner connection thread and the workers it starts run on
//! their engine thread's core (`Config::pin_workers`), read back from /proc.

mod common;

use common::*;
use roma_byob::{Config, Engine};


/// (thread name, allowed cpus, allowed cpus of each child) of the runner's threads.
fn runner_threads(pid: u32) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        // A worker listed here may be reaped before its status is read: skip it.
        let workers = children
            .split_whitespace()
            .filter_map(|child| try_cpus_allowed(&format!("/proc/{child}/status")))
            .collect();
        out.push((comm, cpus_allowed(&format!("{}/status", task.path().display())), workers));
    }
    out.sort();
    out
}

/// `minimal` mode: with `pin_workers` each runner connection thread, and every worker
/// it starts, runs on its engine thread's core; without, anywhere.
#[test]
fn workers_run_on_their_engine_threads_core() {
    let allowed = cpus_allowed("/proc/self/status");
    let last = allowed.rsplit(['-', ',']).next().unwrap().parse::<usize>().unwrap();
    if last == 0 {
        eprintln!("SKIP workers_run_on_their_engine_threads_core: needs two cores, this process may use {allowed}");
        return;
    }
    for pin in [true, false] {
        let e = Engine::new(Config {
            mode: roma_byob::Mode::Minimal,
            cores: vec![0, last],
            pin_workers: pin,
            ..Default::default()
        })
        .unwrap();
        let t = load(&e, "hello_world", 4);
        // Every slot has been filled once executions on both shards came back.
        for _ in 0..8 {
            assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let threads = loop {
            let threads = runner_threads(e.sandbox_pid());
            let workers: usize = threads.iter().map(|(_, _, w)| w.len()).sum();
            if workers >= 4 || std::time::Instant::now() > deadline {
                break threads;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let conns: Vec<_> = threads.iter().filter(|(name, _, _)| name.starts_with("conn-")).collect();
        assert_eq!(conns.len(), 2, "one runner thread per engine thread: {threads:?}");
        for (i, (name, cpus, workers)) in conns.iter().enumerate() {
            let core = [0, last][i];
            if pin {
                assert_eq!(cpus, &core.to_string(), "{name}");
                assert!(workers.iter().all(|w| w == &core.to_string()), "{name}'s workers: {workers:?}");
            } else {
                assert_eq!(cpus, &allowed, "{name}");
                assert!(workers.iter().all(|w| w == &allowed), "{name}'s workers: {workers:?}");
            }
        }
        eprintln!("pin_workers {pin}: {conns:?}");
        let total: usize = conns.iter().map(|(_, _, w)| w.len()).sum();
        assert!(total >= 1, "no worker found under the runner threads: {threads:?}");
    }
}
