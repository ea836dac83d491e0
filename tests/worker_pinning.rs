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
