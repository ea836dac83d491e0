//! Worker channels: made by the runner ahead of need and taken with `pidfd_getfd`
//! (`Config::runner_channels`, minimal mode), or made by the engine thread and sent
//! with the spawn order. Either way every execution works, the runner keeps a host
//! end the engine took only while that channel's worker lives (or the channel is in
//! stock), and neither side leaks channels. Alone in its own test binary so fd
//! counts are not disturbed by other tests.

mod common;

use std::time::{Duration, Instant};

use common::{hello, load};
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, CodeToken, Config, Engine, ExecuteOptions, Mode};

fn fds_of(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .map(|e| std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default())
        .collect()
}

fn sockets(fds: &[String]) -> Vec<&String> {
    fds.iter().filter(|l| l.starts_with("socket:")).collect()
}

/// Waits until `token`'s pool is whole and idle, every other worker is gone, and
/// neither this process's nor the runner's descriptors change for 200 ms (the
/// runner closes a reaped worker's host end a few ms after the reap): a slow
/// machine then gets the time it needs, and the counts below are taken at rest.
fn settle(e: &Engine, token: &CodeToken, pool: usize, runner: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let snapshot = || (fds_of("self"), if runner.is_empty() { Vec::new() } else { fds_of(runner) });
    let mut last = snapshot();
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = snapshot();
        let whole = e.idle_workers(token).unwrap() == pool && e.live_workers() == pool;
        if now != last || !whole {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool of {pool} did not settle within 30 s: {} idle, {} live",
            e.idle_workers(token).unwrap(),
            e.live_workers()
        );
    }
}

/// Channels the runner keeps in stock per engine thread, at most (see
/// `CHANNEL_BATCH` in src/ring/reactor.rs: 8 at a time), with room to spare.
const STOCK_BOUND: usize = 64;

#[test]
fn channels_from_the_runner_or_the_engine_thread_serve_every_execution_and_leak_nothing() {
    let am_root = unsafe { libc::geteuid() } == 0;
    for runner_channels in [true, false] {
        let e = Engine::new(Config { mode: Mode::Minimal, runner_channels, ..Default::default() }).unwrap();
        if runner_channels && !am_root {
            eprintln!("SKIP runner-made channels: not root, pidfd_getfd on the runner may be refused");
        } else {
            assert_eq!(e.runner_makes_channels(), runner_channels);
        }
        let shards = e.config().cores.len().max(roma_byob::ring::current_thread_affinity().len());
        let runner = e.sandbox_pid().to_string();
        let ok = load(&e, "hello_world", 4);
        assert_eq!(hello(&e, &ok).unwrap(), "Hello, world!");
        // The runner's descriptors are readable only as root (see below).
        settle(&e, &ok, 4, if am_root { &runner } else { "" });
        let engine_before = fds_of("self");
        let early = load(&e, "abort_before_ready", 2);

        for _ in 0..100 {
            assert_eq!(hello(&e, &ok).unwrap(), "Hello, world!", "runner_channels {runner_channels}");
        }
        // Workers that die before their ready byte: their channels are released too.
        let quick = ExecuteOptions { worker_wait_timeout: Duration::from_millis(100), ..common::opts() };
        for _ in 0..5 {
            let err = e
                .execute::<_, SampleResponse>(&early, &SampleRequest::default(), quick.clone())
                .unwrap()
                .wait()
                .unwrap_err();
            assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable), "{err}");
        }
        e.delete(&early).unwrap();
        settle(&e, &ok, 4, if am_root { &runner } else { "" });
        if !am_root {
            // The runner is not dumpable for other users: its /proc/PID/fd is closed.
            eprintln!("SKIP the runner's descriptor checks: not root");
            e.shutdown();
            continue;
        }

        let runner_fds = fds_of(&runner);
        let engine_after = fds_of("self");
        let shared: Vec<_> = sockets(&runner_fds).into_iter().filter(|s| sockets(&engine_after).contains(s)).collect();
        let runner_only = sockets(&runner_fds).len() - shared.len();
        let live = e.live_workers();
        if runner_channels {
            // Open in both: the host ends of the live workers' channels (the runner
            // closes its copy when it reaps the worker) and of the engine's stock.
            assert!(
                shared.len() >= live && shared.len() <= live + shards * STOCK_BOUND,
                "runner_channels {runner_channels}: {} sockets open on both sides, {live} live workers",
                shared.len()
            );
            // The runner's own: its control connections and the worker ends of the
            // stock, one per stocked host end. A host end kept after its worker was
            // reaped (100 executions ran) would be counted here.
            assert!(
                runner_only + live <= shards + shared.len(),
                "runner_channels {runner_channels}: {runner_only} sockets only in the runner, {} shared, {live} live workers",
                shared.len()
            );
        } else {
            assert!(shared.is_empty(), "runner_channels {runner_channels}: sockets open on both sides: {shared:?}");
        }
        // The runner's sockets: its control connections and, with runner-made
        // channels, the worker ends of the stock: bounded, whatever ran before.
        let stock = if runner_channels { STOCK_BOUND } else { 0 };
        let n = sockets(&runner_fds).len();
        assert!(n >= shards && n <= shards * (1 + stock), "runner_channels {runner_channels}: {n} runner sockets");
        // Idle pools again: the same non-socket fds in the engine as before the
        // executions, and sockets (control, idle workers, stock) within bounds.
        let others = |fds: &[String]| fds.len() - sockets(fds).len();
        assert_eq!(others(&engine_after), others(&engine_before), "runner_channels {runner_channels}: engine fds");
        let grown = sockets(&engine_after).len().saturating_sub(sockets(&engine_before).len());
        assert!(grown <= shards * stock, "runner_channels {runner_channels}: {grown} more sockets in the engine");
        e.shutdown();
    }
}
