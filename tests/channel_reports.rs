//! The runner's reports of the channels it makes ahead of need (minimal mode,
//! `Config::runner_channels`). Asked for while the engine thread's stock is low,
//! not empty, a report may wait up to `Config::exit_report_hold` for the runner's
//! next message (it then costs the engine thread no wake-up of its own); a stock
//! that runs empty asks for it at once. Alone in its own test binary: it counts
//! this process's sockets.

mod common;

use std::time::{Duration, Instant};

use common::{first_allowed_core, load, wait_idle};
use roma_byob::{Config, Engine, Mode};

fn sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|p| p.to_string_lossy().starts_with("socket:")))
        .count()
}

/// One engine thread, so one stock and one runner connection.
fn one_shard(hold: Duration) -> Engine {
    let first = first_allowed_core();
    let config = Config { mode: Mode::Minimal, cores: vec![first], exit_report_hold: hold, ..Default::default() };
    Engine::new(config).expect("engine")
}

#[test]
fn a_channel_report_asked_ahead_of_need_waits_for_its_deadline_and_an_empty_stock_fetches_it_at_once() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP runner-made channels: not root, pidfd_getfd on the runner may be refused");
        return;
    }
    // 8 workers take the first batch of 8 channels; the 6th spawn found 3 left and
    // asked for the next batch, which may wait up to the hold. The hold is long
    // enough for a starved machine to start the pool well within it.
    let hold = Duration::from_secs(5);
    let e = one_shard(hold);
    assert!(e.runner_makes_channels(), "runner-made channels as root in minimal mode");
    let loaded = Instant::now();
    let t = load(&e, "hello_world", 8);
    wait_idle(&e, &t, 8);
    assert_eq!(e.idle_workers(&t).unwrap(), 8);
    let before = sockets();
    std::thread::sleep(Duration::from_millis(200));
    // The report was asked for after `loaded`: until `hold` after it, it is due
    // only at its deadline.
    let checked = loaded.elapsed();
    if checked < hold {
        assert_eq!(sockets(), before, "the channel report came before its deadline, with nothing else to carry it");
        let deadline = Instant::now() + hold + Duration::from_secs(10);
        while sockets() < before + 8 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sockets(), before + 8, "the deferred report of 8 channels arrived at its deadline (not before the pool was ready, nor never)");
    } else {
        eprintln!("SKIP the deferred report's timing: the pool took {checked:?} to start, past the {hold:?} hold");
    }
    drop(e);

    // A deadline a minute away: the 9th of 12 spawns finds the stock empty and asks
    // for the waiting report at once.
    let e = one_shard(Duration::from_secs(60));
    let start = Instant::now();
    let t = load(&e, "hello_world", 12);
    wait_idle(&e, &t, 12);
    assert_eq!(e.idle_workers(&t).unwrap(), 12, "all 12 workers started ({:?} after the load)", start.elapsed());
}
