//! `minimal` mode: each runner connection thread and the workers it starts run on
//! their engine thread's core (`Config::pin_workers`), read back from /proc.

mod common;

use common::*;
use roma_byob::{Config, Engine};

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
        let threads = runner_threads(e.sandbox_pid(), 4, try_cpus_allowed);
        let conns: Vec<_> = threads.iter().filter(|(name, _, _)| name.starts_with("conn-")).collect();
        assert_eq!(conns.len(), 2, "one runner thread per engine thread: {threads:?}");
        for (i, (name, cpus, workers)) in conns.iter().enumerate() {
            let core = [0, last][i];
            let cpus = cpus.as_deref().unwrap_or_default();
            if pin {
                assert_eq!(cpus, core.to_string(), "{name}");
                assert!(workers.iter().all(|w| w == &core.to_string()), "{name}'s workers: {workers:?}");
            } else {
                assert_eq!(cpus, allowed, "{name}");
                assert!(workers.iter().all(|w| w == &allowed), "{name}'s workers: {workers:?}");
            }
        }
        eprintln!("pin_workers {pin}: {conns:?}");
        let total: usize = conns.iter().map(|(_, _, w)| w.len()).sum();
        assert!(total >= 1, "no worker found under the runner threads: {threads:?}");
    }
}

/// Field 41 of `/proc/.../stat` (the scheduling policy) and field 19 (nice) of the
/// task whose `status` path is given.
fn policy_and_nice(status_path: &str) -> Option<(u32, i32)> {
    let stat = std::fs::read_to_string(status_path.replace("/status", "/stat")).ok()?;
    // Fields after the parenthesised command name, which may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    Some((fields.get(41 - 3)?.parse().ok()?, fields.get(19 - 3)?.parse().ok()?))
}

/// `minimal` mode: the runner's connection threads and every worker run as
/// SCHED_BATCH at nice 10, so none of them preempts an engine thread on wake-up.
#[test]
fn connection_threads_and_workers_run_as_sched_batch_at_nice_10() {
    let e = Engine::new(Config { mode: roma_byob::Mode::Minimal, ..Default::default() }).unwrap();
    let t = load(&e, "hello_world", 4);
    assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    let threads = runner_threads(e.sandbox_pid(), 4, policy_and_nice);
    let conns: Vec<_> = threads.iter().filter(|(name, _, _)| name.starts_with("conn-")).collect();
    assert!(!conns.is_empty(), "no connection thread: {threads:?}");
    let batch = (libc::SCHED_BATCH as u32, 10);
    for (name, sched, workers) in &conns {
        assert_eq!(*sched, Some(batch), "{name}: (policy, nice)");
        assert!(workers.iter().all(|w| *w == batch), "{name}'s workers: {workers:?}");
    }
    let total: usize = conns.iter().map(|(_, _, w)| w.len()).sum();
    assert!(total >= 1, "no worker found under the runner threads: {threads:?}");
    // The runner's main thread (the reaper) keeps the normal policy.
    let main = threads.iter().find(|(name, _, _)| !name.starts_with("conn-")).expect("the runner's main thread");
    assert_eq!(main.1.map(|(policy, _)| policy), Some(libc::SCHED_OTHER as u32), "{main:?}");
}
