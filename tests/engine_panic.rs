//! An engine thread that panics (a bug) loses nothing: every execution it held or
//! is sent afterwards completes exactly once with `Internal`, the other engine
//! threads keep serving, and the engine still shuts down. The panic is injected
//! through the `fault-injection` feature (`Engine::inject_engine_panic`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{hello, load, modes, opts, shard_of, wait_idle};
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, Config, Engine, Mode};

fn engine_on(mode: Mode, shards: usize) -> Engine {
    // Every shard on one core, so the test needs a single core.
    let core = roma_byob::ring::current_thread_affinity()[0];
    Engine::new(Config { mode, cores: vec![core; shards], ..Default::default() })
        .unwrap_or_else(|e| panic!("engine in {mode:?}: {e}"))
}

/// Stops the engine on another thread; fails the test if that takes over 30 s.
fn shut_down(e: Engine) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        e.shutdown();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the engine shuts down after an engine thread panicked");
}

#[test]
fn a_panicking_engine_thread_fails_its_executions_and_the_others_keep_serving() {
    for mode in modes() {
        let e = engine_on(mode, 2);
        // One worker per shard, each kept busy by an execution that never answers.
        let hang = load(&e, "never_answer", 2);
        // Both ready first: an execution that finds no ready worker may queue on
        // either shard (seen in gVisor mode on a loaded machine).
        wait_idle(&e, &hang, 2);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let (done, tx) = (done.clone(), tx.clone());
            let token = e
                .execute_with_callback::<_, SampleResponse, _>(&hang, &SampleRequest::default(), opts(), move |r| {
                    done.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(r.map(|_| ()));
                })
                .unwrap();
            tokens.push(token);
        }
        let shards: Vec<usize> = tokens.iter().map(shard_of).collect();
        assert_ne!(shards[0], shards[1], "{mode:?}: one worker per shard, so the two executions run on different shards");
        std::thread::sleep(Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "{mode:?}: nothing completed before the panic");

        e.inject_engine_panic(shards[0]);
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the failed shard's execution completes").unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{mode:?}: {err}");
        assert!(err.message().contains("panicked"), "{mode:?}: {err}");
        // The other shard still runs its execution: cancelling it works.
        e.cancel(&tokens[1]).unwrap();
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the live shard's execution completes").unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{mode:?}: {err}");

        // New work goes to the live shard only, and all of it succeeds.
        let t = load(&e, "hello_world", 2);
        for _ in 0..20 {
            assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{mode:?}");
        }
        // The old token lost its slot on the failed shard: its executions go to the
        // live one, and each completes once.
        let (tx2, rx2) = mpsc::channel();
        let sent = 8;
        for _ in 0..sent {
            let (done, tx2) = (done.clone(), tx2.clone());
            let o = roma_byob::ExecuteOptions {
                worker_wait_timeout: Duration::from_millis(500),
                timeout: Duration::from_secs(1),
                ..opts()
            };
            e.execute_with_callback::<_, SampleResponse, _>(&hang, &SampleRequest::default(), o, move |r| {
                done.fetch_add(1, Ordering::SeqCst);
                let _ = tx2.send(r.map(|_| ()));
            })
            .unwrap();
        }
        for _ in 0..sent {
            let r = rx2.recv_timeout(Duration::from_secs(20)).expect("every execution completes");
            // `never_answer` holds the live shard's worker until the deadline, or
            // the execution waits for a worker in vain; none succeeds.
            let code = r.unwrap_err().code();
            assert!(matches!(code, Code::Internal | Code::DeadlineExceeded), "{mode:?}: {code:?}");
        }
        shut_down(e);
        assert_eq!(done.load(Ordering::SeqCst), 2 + sent, "{mode:?}: every callback ran exactly once");
    }
}

#[test]
fn with_its_only_engine_thread_failed_an_engine_answers_every_execution_with_an_error() {
    for mode in modes() {
        let e = engine_on(mode, 1);
        let t = load(&e, "hello_world", 1);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{mode:?}");
        e.inject_engine_panic(0);
        // The panic is handled on the engine thread: wait for the first refusal.
        let mut last = None;
        for _ in 0..100 {
            match hello(&e, &t) {
                Err(err) if err.code() == Code::Internal => {
                    last = Some(err);
                    break;
                }
                other => {
                    // Sent before the shard had failed: it still completes.
                    let _ = other;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let err = last.expect("executions fail with Internal once the engine thread failed");
        assert!(err.message().contains("panicked"), "{mode:?}: {err}");
        // Tokens loaded afterwards cannot run either, and say why.
        let t2 = load(&e, "hello_world", 1);
        let err = hello(&e, &t2).unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{mode:?}: {err}");
        shut_down(e);
    }
}

#[test]
fn an_execution_held_by_a_panicking_engine_thread_is_answered_once() {
    for mode in modes() {
        let e = engine_on(mode, 2);
        let t = load(&e, "hello_world", 2);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{mode:?}");
        // The engine thread panics while the execution is in its hands, outside any
        // table: the answer comes from the execution's own guard.
        let mut o = opts();
        o.metadata.insert(roma_byob::FAULT_KEY.to_string(), "panic-in-execute".to_string());
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let c = calls.clone();
        e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), o, move |r| {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(r.map(|_| ()));
        })
        .unwrap();
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the execution is answered").unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{mode:?}: {err}");
        // The same through `wait`, on a worker the caller claimed: it reads the
        // worker's answer from the socket itself (Config::caller_reads), which the
        // failed engine thread does not stop; if the worker is gone first, it gets
        // the guard's error. Once either way.
        let mut o = opts();
        o.metadata.insert(roma_byob::FAULT_KEY.to_string(), "panic-in-execute".to_string());
        match e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o).unwrap().wait() {
            Ok(r) => {
                assert_eq!(r.response.greeting, "Hello, world!", "{mode:?}");
                assert!(r.metrics.read_by_caller, "{mode:?}: only the caller can have read this answer");
            }
            Err(err) => assert_eq!(err.code(), Code::Internal, "{mode:?}: {err}"),
        }
        // With the engine thread reading every response, `wait` gets the guard's.
        let core = roma_byob::ring::current_thread_affinity()[0];
        let engine_reads = Engine::new(Config { mode, cores: vec![core; 2], caller_reads: false, ..Default::default() }).unwrap();
        let t3 = load(&engine_reads, "hello_world", 2);
        let mut o = opts();
        o.metadata.insert(roma_byob::FAULT_KEY.to_string(), "panic-in-execute".to_string());
        let err = engine_reads.execute::<_, SampleResponse>(&t3, &SampleRequest::default(), o).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{mode:?}: {err}");
        shut_down(engine_reads);
        // Whatever shard is left keeps serving; the engine still shuts down.
        let _ = hello(&e, &t);
        shut_down(e);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{mode:?}: the callback ran exactly once");
    }
}
