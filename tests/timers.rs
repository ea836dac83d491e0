//! An engine thread sleeps until the next timer that can still act: the timeouts
//! of executions that ended (and the start deadlines of workers that exited) do
//! not wake it. Alone in its test binary, so the `roma-ring-*` threads counted are
//! this test's engine's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::ExecuteOptions;

/// Voluntary context switches (sleeps, so wake-ups) of this process's engine threads.
fn engine_wakeups() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("roma-ring-") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap();
        total += line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    }
    total
}

#[test]
fn an_idle_engine_does_not_wake_for_the_timeouts_of_finished_executions() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    const BURST: usize = 400;
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "hello_nolibc", 4);
        wait_idle(&e, &t, 4);
        let opts = ExecuteOptions { timeout: TIMEOUT, worker_wait_timeout: Duration::from_secs(10), ..Default::default() };
        let start = Instant::now();
        // Eight at a time: each execution leaves its timeout (and its worker's start
        // deadline) behind in the engine thread's timers.
        for chunk in (0..BURST).collect::<Vec<_>>().chunks(8) {
            let pending: Vec<_> = chunk
                .iter()
                .map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts.clone()).unwrap())
                .collect();
            for p in pending {
                assert_eq!(p.wait().unwrap().response.greeting, "Hello, world!");
            }
        }
        let burst = start.elapsed();
        wait_idle(&e, &t, 4);
        // The window holds the timeouts of the executions started in the burst's
        // last TIMEOUT (all of them if the burst was shorter), each due while the
        // engine has nothing to do.
        let before = engine_wakeups();
        let window_end = Instant::now() + TIMEOUT + Duration::from_millis(200);
        std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
        let woke = engine_wakeups() - before;
        let due = if burst <= TIMEOUT { BURST } else { (BURST as f64 * TIMEOUT.as_secs_f64() / burst.as_secs_f64()) as usize };
        println!("{mode:?}: {BURST} executions in {burst:?}; ~{due} of their timeouts came due in an idle window of {:?}; engine threads woke {woke} times", TIMEOUT + Duration::from_millis(200));
        // An idle engine thread wakes about once a second (IDLE_WAKE) and for
        // whatever the sandbox reports; one wake-up per distinct stale timeout would
        // be hundreds.
        assert!(woke <= 30, "{mode:?}: the engine threads woke {woke} times while idle (~{due} stale timeouts due)");
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    }
}
