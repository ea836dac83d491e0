//! Core engine behaviour (issue: load, execute, cancel, delete, logs, errors), in
//! every available mode.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, Config, Engine, ExecuteOptions, LoadOptions};

#[test]
fn load_and_execute_hello_world() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "hello_world", 1);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "second execution on a fresh worker");
    }
}

#[test]
fn rust_udf_and_static_udfs() {
    for mode in modes() {
        let e = engine(mode);
        for name in ["hello_world_rs", "hello_world_static", "hello_world_rs_static", "hello_nolibc"] {
            let t = load(&e, name, 1);
            assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{name}");
        }
    }
}

#[test]
fn two_binaries_side_by_side() {
    for mode in modes() {
        let e = engine(mode);
        let a = load(&e, "hello_world", 2);
        let b = load(&e, "new_udf", 2);
        for _ in 0..3 {
            assert_eq!(hello(&e, &a).unwrap(), "Hello, world!");
            assert_eq!(hello(&e, &b).unwrap(), "I am a new UDF!");
        }
    }
}

#[test]
fn load_from_blob() {
    for mode in modes() {
        let e = engine(mode);
        let bytes = std::fs::read(sample("new_udf")).unwrap();
        let t = e.load_blob(&bytes, LoadOptions { workers: 1, ..Default::default() }).unwrap();
        assert_eq!(hello(&e, &t).unwrap(), "I am a new UDF!");
    }
}

#[test]
fn prime_sieve() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "prime_sieve", 1);
        let r = e
            .execute::<_, SampleResponse>(&t, &SampleRequest { prime_bound: 100 }, opts())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(r.response.prime_number.len(), 25);
        assert_eq!(r.response.prime_number.last(), Some(&97));
    }
}

#[test]
fn async_callback_form() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "hello_world", 2);
        let (tx, rx) = mpsc::channel();
        for _ in 0..5 {
            let tx = tx.clone();
            e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), opts(), move |r| {
                tx.send(r.map(|r| r.response.greeting)).unwrap();
            })
            .unwrap();
        }
        for _ in 0..5 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap(), "Hello, world!");
        }
        // And the future form, polled by a plain executor.
        let fut = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap();
        let r = futures_executor::block_on(fut).unwrap();
        assert_eq!(r.response.greeting, "Hello, world!");
    }
}

/// Batched waits that end after a few completions (`Config::batch_want`), applied
/// from two executions in flight: every execution is still answered once, with the
/// UDF's response, and no worker is left behind.
#[test]
fn small_batches_answer_every_execution_once() {
    for mode in modes() {
        let config = Config {
            mode,
            batch_want: 2,
            batch_min_in_flight: 2,
            batch_wait: Duration::from_micros(300),
            ..Default::default()
        };
        let e = Engine::new(config).unwrap_or_else(|err| panic!("engine in {mode:?}: {err}"));
        let t = load(&e, "hello_world", 4);
        let (tx, rx) = mpsc::channel();
        let n = 40;
        // 40 queued on 4 workers: in gVisor on a starved machine the last may wait
        // longer than opts()'s 10 s for a worker.
        let queued = ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), ..opts() };
        for i in 0..n {
            let tx = tx.clone();
            e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), queued.clone(), move |r| {
                tx.send((i, r.map(|r| r.response.greeting))).unwrap();
            })
            .unwrap();
        }
        let mut seen = vec![0; n];
        for _ in 0..n {
            let (i, r) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(r.unwrap(), "Hello, world!", "{mode:?}: execution {i}");
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&c| c == 1), "{mode:?}: answers per execution {seen:?}");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "{mode:?}: an execution was answered twice");
        assert_eq!(wait_live(&e, 4), 4, "{mode:?}: workers left after the batch");
    }
}

#[test]
fn no_log_egress_by_default() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "log_udf", 1);
        let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.greeting, "Hello, world!");
        let err = r.logs.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("logs are not captured"), "{err}");
    }
}

#[test]
fn log_egress_by_choice() {
    for mode in modes() {
        let e = engine(mode);
        let t = e.load(sample("log_udf"), LoadOptions { workers: 1, log_egress: true, ..Default::default() }).unwrap();
        for _ in 0..2 {
            let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
            let logs = r.logs.unwrap();
            assert_eq!(String::from_utf8_lossy(&logs.stdout), "I am a stdout log.\n");
            assert_eq!(String::from_utf8_lossy(&logs.stderr), "I am a stderr log.\n");
        }
    }
}

#[test]
fn load_for_logging_outlives_the_original_token() {
    for mode in modes() {
        let e = engine(mode);
        let original = load(&e, "log_udf", 1);
        let logging = e.load_for_logging(&original, 1).unwrap();
        let r = e.execute::<_, SampleResponse>(&logging, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
        assert_eq!(r.logs.unwrap().stdout, b"I am a stdout log.\n");
        e.delete(&original).unwrap();
        assert_eq!(hello(&e, &original).unwrap_err().code(), Code::NotFound);
        let r = e.execute::<_, SampleResponse>(&logging, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.greeting, "Hello, world!");
        assert_eq!(r.logs.unwrap().stderr, b"I am a stderr log.\n");
    }
}

#[test]
fn execute_then_delete() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "never_answer", 1);
        let pending = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        e.delete(&t).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || drop(tx.send(pending.wait())));
        // Well before the execution's own timeout (opts()), with room for a slow machine.
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("completes within 10 s").unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{err}");
        assert!(err.message().contains("deleted"), "{err}");
        assert_eq!(e.delete(&t).unwrap_err().code(), Code::NotFound);
        let t2 = load(&e, "hello_world", 1);
        assert_eq!(hello(&e, &t2).unwrap(), "Hello, world!");
    }
}

#[test]
fn execute_then_cancel() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "never_answer", 1);
        let pending = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        e.cancel(pending.token()).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || drop(tx.send(pending.wait())));
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("completes within 10 s").unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{err}");
        // The slot gets a fresh worker: the token keeps working.
        let next = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap();
        e.cancel(next.token()).unwrap();
        assert_eq!(next.wait().unwrap_err().code(), Code::Cancelled);
    }
}

#[test]
fn execution_timeout_kills_the_worker() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "never_answer", 1);
        let o = ExecuteOptions { timeout: Duration::from_millis(300), ..opts() };
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(err.message().contains("timeout"), "{err}");
    }
}

/// Options for the worker-lifetime tests: waits long enough for a loaded machine.
fn patient() -> ExecuteOptions {
    ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), timeout: Duration::from_secs(60), ..opts() }
}

#[test]
fn a_worker_that_outlives_its_execution_is_killed_at_the_timeout() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "linger_after_response", 2);
        let o = ExecuteOptions { timeout: Duration::from_secs(5), ..patient() };
        for _ in 0..6 {
            let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o.clone()).unwrap().wait();
            assert_eq!(r.unwrap().response.greeting, "Hello, world!", "{mode:?}");
        }
        // Each answered and kept running; each is killed when its execution's
        // timeout passes, leaving the pool of 2 (without the kill: 8 for ever).
        assert_eq!(wait_live(&e, 2), 2, "{mode:?}: worker processes left after their executions' timeouts");
        // Loaded for logging, a response waits for the worker's exit (to collect its
        // output): at the timeout the lingering worker is killed and the complete
        // response is delivered, not an error.
        let logging = e.load_for_logging(&t, 1).unwrap();
        let r = e.execute::<_, SampleResponse>(&logging, &SampleRequest::default(), o.clone()).unwrap().wait();
        let r = r.unwrap_or_else(|err| panic!("{mode:?}: {err}"));
        assert_eq!(r.response.greeting, "Hello, world!", "{mode:?}");
        assert!(r.logs.is_ok(), "{mode:?}");
    }
}

#[test]
fn a_worker_that_never_signals_readiness_is_killed_at_the_start_timeout() {
    for mode in modes() {
        let config = Config { mode, worker_start_timeout: Duration::from_millis(300), ..Default::default() };
        let e = Engine::new(config).unwrap();
        let t = load(&e, "never_ready", 2);
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), patient()).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        assert!(err.message().contains("did not signal readiness within 300 ms"), "{mode:?}: {err}");
        // Every worker started meanwhile, killed or not, is gone once the token is.
        e.delete(&t).unwrap();
        assert_eq!(wait_live(&e, 0), 0, "{mode:?}: worker processes left");
    }
}

#[test]
fn a_worker_that_closes_its_channel_and_keeps_running_is_killed() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "close_before_ready", 1);
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), patient()).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        assert!(err.message().contains("closed its channel before its request and had not exited"), "{mode:?}: {err}");
        e.delete(&t).unwrap();
        assert_eq!(wait_live(&e, 0), 0, "{mode:?}: worker processes left");
    }
}

#[test]
fn a_worker_that_closes_its_channel_without_answering_fails_before_the_timeout() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "close_after_request", 1);
        // A 60 s timeout would end it with DeadlineExceeded; the closed channel ends
        // it before, with Unavailable.
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), patient()).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        assert!(err.message().contains("closed its channel") && err.message().contains("it was killed"), "{mode:?}: {err}");
        // The slot serves again (a fresh worker), and the killed one is reaped.
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), patient()).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        assert_eq!(wait_live(&e, 1), 1, "{mode:?}");
    }
}

#[test]
fn worker_wait_timeout() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "never_answer", 1);
        let busy = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let o = ExecuteOptions { worker_wait_timeout: Duration::from_millis(200), ..opts() };
        let err = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(err.message().contains("no workers available"), "{err}");
        e.cancel(busy.token()).unwrap();
        assert_eq!(busy.wait().unwrap_err().code(), Code::Cancelled);
    }
}

/// `Duration::MAX` means "no limit" for both timeouts: accepted on both request
/// paths (handed over to a ready worker, and queued for one), never a panic.
#[test]
fn unbounded_timeouts_are_accepted() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "hello_world", 1);
        let o = ExecuteOptions { worker_wait_timeout: Duration::MAX, timeout: Duration::MAX, ..opts() };
        // Two at once: the second waits for the slot's next worker.
        let first = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o.clone()).unwrap();
        let second = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o).unwrap();
        assert_eq!(first.wait().unwrap().response.greeting, "Hello, world!", "{mode:?}");
        assert_eq!(second.wait().unwrap().response.greeting, "Hello, world!", "{mode:?}");
    }
}

#[test]
fn bad_input_fails_at_the_call() {
    for mode in modes() {
        let e = engine(mode);
        let unknown: roma_byob::CodeToken = "code-999999".parse().unwrap();
        let err = e.execute::<_, SampleResponse>(&unknown, &SampleRequest::default(), opts()).err().unwrap();
        assert_eq!(err.code(), Code::NotFound);

        let err = e.load("/definitely/not/here", LoadOptions::default()).unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err}");

        let dir = std::env::temp_dir().join(format!("roma-byob-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_exec = dir.join("not_exec");
        std::fs::copy(sample("hello_world"), &not_exec).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = e.load(&not_exec, LoadOptions::default()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("not executable"), "{err}");

        let script = dir.join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = e.load(&script, LoadOptions::default()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("not an ELF"), "{err}");
        let err = e.load_blob(b"garbage", LoadOptions::default()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        let err = e.load(sample("hello_world"), LoadOptions { workers: 0, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("workers"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn failing_udfs_fail_their_execution_and_the_engine_keeps_serving() {
    for mode in modes() {
        let e = engine(mode);
        let good = load(&e, "hello_world", 1);
        check_failing_udfs(&e, &good, |name| load(&e, name, 1));
    }
}

#[test]
fn concurrent_executions_complete_exactly_once() {
    for mode in modes() {
        let e = Arc::new(engine(mode));
        let t = load(&e, "hello_world", 10);
        // gVisor starts a glibc process in ~10 ms (ptrace platform): 2,000 queued
        // executions need a long worker wait there.
        let opts = || ExecuteOptions { worker_wait_timeout: Duration::from_secs(300), ..opts() };
        let ok = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (e, ok) = (e.clone(), ok.clone());
                std::thread::spawn(move || {
                    let pending: Vec<_> = (0..250)
                        .map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap())
                        .collect();
                    for p in pending {
                        let r = p.wait().unwrap();
                        assert_eq!(r.response.greeting, "Hello, world!");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(ok.load(Ordering::Relaxed), 2000);
        // Callbacks too: each fires exactly once.
        let fired = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..200 {
            let (fired, tx) = (fired.clone(), tx.clone());
            e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), opts(), move |r| {
                r.unwrap();
                fired.fetch_add(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        for _ in 0..200 {
            rx.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fired.load(Ordering::SeqCst), 200);
    }
}

#[test]
fn memory_limit_fails_the_execution_and_the_next_one_works() {
    use roma_byob::proto::sample::AllocRequest;
    use roma_byob::{Config, Engine, MemoryLimit};
    for mode in modes() {
        let limit = MemoryLimit { soft_bytes: 128 << 20, hard_bytes: 128 << 20 };
        let e = Engine::new(Config { mode, memory_limit: Some(limit), ..Default::default() }).unwrap();
        let t = load(&e, "alloc", 1);
        let alloc = |mb| e.execute::<_, SampleResponse>(&t, &AllocRequest { megabytes: mb }, opts()).unwrap().wait();
        let err = alloc(512).unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains("exited with status 4"), "{err}");
        assert_eq!(alloc(16).unwrap().response.greeting, "allocated 16 MB");
    }
}

#[test]
fn sqpoll_engine_serves_executions() {
    let e = roma_byob::Engine::new(roma_byob::Config { sqpoll_idle: Some(std::time::Duration::from_millis(10)), ..Default::default() }).unwrap();
    let t = load(&e, "hello_world", 2);
    for _ in 0..20 {
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    }
}

#[test]
fn sort_list_sorts() {
    use roma_byob::proto::sample::{SortListRequest, SortListResponse};
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "sort_list", 1);
        for req in [SortListRequest { count: 10_000, seed: 42 }, SortListRequest { count: 0, seed: 0 }] {
            let r = e.execute::<_, SortListResponse>(&t, &req, opts()).unwrap().wait().unwrap().response;
            assert_eq!(r, roma_byob::samples::sort_list_reference(&req));
        }
        // The reference itself: sorted output, checksum over it.
        let r = roma_byob::samples::sort_list_reference(&SortListRequest { count: 3, seed: 1 });
        assert!(r.min <= r.max && r.count == 3);
    }
}

#[test]
fn each_worker_runs_its_own_code_across_deletes_and_loads() {
    // The runner reuses fd numbers of deleted binaries; a worker must still exec the
    // binary of its own code (the spawner keeps the last binary in a slot).
    for mode in modes() {
        let e = engine(mode);
        for round in 0..4 {
            let h = load(&e, "hello_world", 2);
            assert_eq!(hello(&e, &h).unwrap(), "Hello, world!", "{mode:?}, round {round}");
            let p = load(&e, "probe", 2);
            assert_eq!(probe(&e, &p, "open_fds", ""), "0,1,2,3", "{mode:?}, round {round}");
            assert_eq!(hello(&e, &h).unwrap(), "Hello, world!", "{mode:?}, round {round}, after the probe");
            if round % 2 == 0 {
                e.delete(&h).unwrap();
                e.delete(&p).unwrap();
            } else {
                e.delete(&p).unwrap();
                e.delete(&h).unwrap();
            }
        }
    }
}
