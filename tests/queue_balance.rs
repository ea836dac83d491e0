//! An execution that finds no ready worker queues on the shard with the fewest
//! executions queued per worker slot (`ShardSlots::queued`), not on the shard of
//! the caller's own core. Before, a caller's backlog all queued on its own core's
//! shard while the other shard offered each worker it freed to newer requests:
//! under open-loop load at 5,000/s that left p99 at 57-200 ms (BENCHMARKS.md).
//! `Engine::queued_executions` reads the shards' counts back.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{load, modes, opts, shard_of, wait_idle};
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, Config, Engine};

/// Lets the calling thread run on `cores` only.
fn run_on(cores: &[usize]) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it (each core is below
    // CPU_SETSIZE, as the kernel reported it); sched_setaffinity reads it for the
    // calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "set the test thread's cores to {cores:?}: {}", std::io::Error::last_os_error());
}

#[test]
fn a_backlog_queues_on_every_shard_not_on_the_callers_core() {
    let cores = roma_byob::ring::current_thread_affinity();
    if cores.len() < 2 {
        eprintln!("SKIP a_backlog_queues_on_every_shard_not_on_the_callers_core: needs two cores, this process may use {cores:?}");
        return;
    }
    for mode in modes() {
        let e = Engine::new(Config { mode, cores: vec![cores[0], cores[1]], ..Default::default() })
            .unwrap_or_else(|e| panic!("engine in {mode:?}: {e}"));
        // The caller sits on shard 0's core, which routing used to prefer.
        run_on(&cores[..1]);
        // One worker per shard, each then held by an execution that never answers:
        // nothing after those two finds a ready worker.
        let t = load(&e, "never_answer", 2);
        wait_idle(&e, &t, 2);
        let (tx, rx) = mpsc::channel();
        let submit = || {
            let tx = tx.clone();
            e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), opts(), move |r| {
                let _ = tx.send(r.map(|_| ()));
            })
            .unwrap()
        };
        let holders: Vec<_> = (0..2).map(|_| submit()).collect();
        let mut held: Vec<usize> = holders.iter().map(shard_of).collect();
        held.sort();
        assert_eq!(held, [0, 1], "{mode:?}: the two ready workers, one per shard, take the first two executions");

        const QUEUED: usize = 12;
        let queued: Vec<_> = (0..QUEUED).map(|_| submit()).collect();
        let on_0 = queued.iter().filter(|x| shard_of(x) == 0).count();
        assert!(
            (QUEUED / 3..=QUEUED - QUEUED / 3).contains(&on_0),
            "{mode:?}: {on_0} of {QUEUED} queued executions went to the caller's core's shard, {} to the other",
            QUEUED - on_0
        );

        // Once both engine threads have taken them, the count is exact.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.queued_executions(&t).unwrap() != QUEUED && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(e.queued_executions(&t).unwrap(), QUEUED, "{mode:?}: executions waiting for a worker");

        // Each completes exactly once when cancelled.
        for x in holders.iter().chain(&queued) {
            e.cancel(x).unwrap();
        }
        for _ in 0..QUEUED + 2 {
            let err = rx.recv_timeout(Duration::from_secs(30)).expect("every execution completes").unwrap_err();
            assert_eq!(err.code(), Code::Cancelled, "{mode:?}: {err}");
        }
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "{mode:?}: an execution completed twice");
        assert_eq!(e.queued_executions(&t).unwrap(), 0, "{mode:?}: nothing waits after the cancels");
        e.shutdown();
        run_on(&cores);
    }
}
