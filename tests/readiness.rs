//! Worker readiness (DESIGN §5: a worker writes its ready byte, then reads its
//! request; the execution's timeout starts at the ready byte), with
//! `Config::lazy_readiness` on (the default: workers are offered before their
//! ready byte, and whoever claims one takes the byte) and off, and with
//! `Config::early_dispatch` on (the default: under load a queued request is
//! written to a worker still starting) and off, in every available mode.

mod common;

use std::time::Duration;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, Mode};

/// A timeout under slow_ready's 300 ms before its ready byte: one that started when
/// the worker was claimed or the request written would fire; 250 ms leaves the rest
/// of the execution room on a slow machine.
fn within_slow_readys_start() -> ExecuteOptions {
    ExecuteOptions { timeout: Duration::from_millis(250), worker_wait_timeout: Duration::from_secs(30), ..Default::default() }
}

#[test]
fn a_request_waits_for_its_workers_ready_byte_and_its_timeout_starts_there() {
    for mode in modes() {
        for lazy_readiness in [true, false] {
            let e = Engine::new(Config { mode, lazy_readiness, ..Default::default() }).unwrap();
            // slow_ready sleeps 300 ms before its ready byte; each execution gets a
            // fresh worker, claimed (lazy) or queued for (not) while it sleeps.
            let t = load(&e, "slow_ready", 1);
            let opts = within_slow_readys_start();
            for i in 0..3 {
                let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts.clone()).unwrap().wait();
                let r = r.unwrap_or_else(|err| {
                    panic!("{mode:?}, lazy_readiness {lazy_readiness}, execution {i}: the 250 ms timeout must start at the ready byte: {err}")
                });
                assert_eq!(r.response.greeting, "Hello, world!");
            }
        }
    }
}

/// Worker processes of a `minimal` engine: the children of the runner's threads.
fn worker_pids(e: &Engine) -> Vec<String> {
    let pid_of = |status: &str| {
        std::path::Path::new(status).exists().then(|| status.split('/').nth(2).unwrap_or_default().to_string())
    };
    let mut pids: Vec<String> =
        runner_threads(e.sandbox_pid(), 1, pid_of).into_iter().flat_map(|(_, _, children)| children).collect();
    pids.sort();
    pids
}

#[test]
fn a_started_worker_nobody_claimed_outlives_its_start_deadline() {
    for mode in modes() {
        // A start deadline well above a worker's start even on a starved machine (a
        // worker without its ready byte by then is rightly killed).
        let config = Config { mode, worker_start_timeout: Duration::from_secs(2), ..Default::default() };
        let e = Engine::new(config).unwrap();
        let t = load(&e, "hello_world", 1);
        // Offered before its ready byte was read, and not claimed by its start
        // deadline: the shard looks for the byte then, finds it, and keeps the worker.
        let before = (mode == Mode::Minimal).then(|| worker_pids(&e));
        std::thread::sleep(Duration::from_millis(3000));
        if let Some(before) = before {
            assert_eq!(before.len(), 1, "one worker: {before:?}");
            assert_eq!(worker_pids(&e), before, "the worker was replaced: it was killed at its start deadline");
        } else {
            // gVisor's workers are not host processes: only the answer is checked.
            eprintln!("{mode:?}: worker identity not checked (workers are not host processes)");
        }
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{mode:?}");
        assert_eq!(wait_live(&e, 1), 1, "{mode:?}");
    }
}

#[test]
fn the_engine_thread_takes_unconfirmed_workers_for_requests_it_dispatches_itself() {
    for mode in modes() {
        // Workers are offered unconfirmed (hand-over on), but no request is small
        // enough for a caller to hand over: every one goes through the engine thread,
        // which must take the ready byte of a worker offered before it (or wait for
        // it) first.
        // The start deadline (where an unconfirmed worker is looked at anyway) comes
        // long after the requests' worker wait runs out.
        let config = Config { mode, hand_over_max_bytes: 0, worker_start_timeout: Duration::from_secs(60), ..Default::default() };
        let e = Engine::new(config).unwrap();
        let opts = ExecuteOptions { worker_wait_timeout: Duration::from_secs(15), ..opts() };
        let run = |t: &CodeToken| e.execute::<_, SampleResponse>(t, &SampleRequest::default(), opts.clone()).unwrap();
        for name in ["hello_world", "slow_ready"] {
            let t = load(&e, name, 3);
            for _ in 0..6 {
                std::thread::sleep(Duration::from_millis(5));
                assert_eq!(run(&t).wait().unwrap().response.greeting, "Hello, world!", "{mode:?} {name}");
            }
            let pending: Vec<_> = (0..12).map(|_| run(&t)).collect();
            for p in pending {
                assert_eq!(p.wait().unwrap().response.greeting, "Hello, world!", "{mode:?} {name}");
            }
            e.delete(&t).unwrap();
        }
    }
}

#[test]
fn queued_requests_are_written_to_starting_workers_and_their_timeout_starts_at_the_ready_byte() {
    for mode in modes() {
        for early_dispatch in [true, false] {
            let e = Engine::new(Config { mode, early_dispatch, ..Default::default() }).unwrap();
            // One slow_ready worker (300 ms before its ready byte) and four requests
            // at once: the first takes the loaded worker, the other three queue, and
            // with early dispatch each is written to the worker spawned when the one
            // before it ends, 300 ms before that worker's ready byte.
            let t = load(&e, "slow_ready", 1);
            let opts = within_slow_readys_start();
            let runs: Vec<_> =
                (0..4).map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts.clone()).unwrap()).collect();
            let mut written_early = 0;
            for (i, run) in runs.into_iter().enumerate() {
                let r = run.wait().unwrap_or_else(|err| {
                    panic!("{mode:?}, early_dispatch {early_dispatch}, execution {i}: the 250 ms timeout must start at the ready byte: {err}")
                });
                assert_eq!(r.response.greeting, "Hello, world!");
                written_early += usize::from(r.metrics.written_before_ready);
            }
            if early_dispatch {
                // Three in the expected order of events; two at least whatever the
                // timing of the first request.
                assert!(written_early >= 2, "{mode:?}: only {written_early} of 4 requests were written to a starting worker");
            } else {
                assert_eq!(written_early, 0, "{mode:?}: a request was written before its worker's ready byte");
            }
        }
    }
}

#[test]
fn a_worker_that_fails_to_start_fails_only_the_request_written_to_it() {
    for mode in modes() {
        let config = Config { mode, worker_start_timeout: Duration::from_millis(300), ..Default::default() };
        let e = Engine::new(config).unwrap();
        let opts = ExecuteOptions { worker_wait_timeout: Duration::from_secs(30), ..Default::default() };
        // Every worker aborts before its ready byte, or never sends it: each start
        // fails one request, the queued one at first and then the one written to
        // the worker started after the back-off, with the start's own error.
        for (name, why) in
            [("abort_before_ready", "exited before signalling readiness"), ("never_ready", "did not signal readiness within 300 ms")]
        {
            let t = load(&e, name, 1);
            let runs: Vec<_> =
                (0..3).map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts.clone()).unwrap()).collect();
            for (i, run) in runs.into_iter().enumerate() {
                let err = run.wait().unwrap_err();
                assert_eq!(err.code(), roma_byob::Code::Unavailable, "{mode:?} {name} execution {i}: {err}");
                assert!(err.message().contains(why), "{mode:?} {name} execution {i}: {err}");
            }
            e.delete(&t).unwrap();
        }
        // The engine still serves.
        let t = load(&e, "hello_world", 1);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{mode:?}");
        assert_eq!(wait_live(&e, 1), 1, "{mode:?}: worker processes left");
    }
}

#[test]
fn requests_written_to_starting_workers_keep_their_own_logs() {
    for mode in modes() {
        let e = Engine::new(Config { mode, ..Default::default() }).unwrap();
        // One logging worker and eight requests at once: seven queue, and each is
        // written to the worker spawned for it before that worker's ready byte. Each
        // gets exactly its own worker's output (memfds per worker), whichever path.
        let t = e.load_for_logging(&load(&e, "log_udf", 1), 1).unwrap();
        let opts = ExecuteOptions { worker_wait_timeout: Duration::from_secs(30), ..Default::default() };
        let runs: Vec<_> =
            (0..8).map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts.clone()).unwrap()).collect();
        let mut written_early = 0;
        for (i, run) in runs.into_iter().enumerate() {
            let r = run.wait().unwrap_or_else(|err| panic!("{mode:?}, execution {i}: {err}"));
            assert_eq!(r.response.greeting, "Hello, world!", "{mode:?}, execution {i}");
            let logs = r.logs.unwrap_or_else(|err| panic!("{mode:?}, execution {i}: {err}"));
            assert_eq!(String::from_utf8_lossy(&logs.stdout), "I am a stdout log.\n", "{mode:?}, execution {i}");
            assert_eq!(String::from_utf8_lossy(&logs.stderr), "I am a stderr log.\n", "{mode:?}, execution {i}");
            written_early += usize::from(r.metrics.written_before_ready);
        }
        assert!(written_early >= 1, "{mode:?}: no request was written to a starting worker");
    }
}
