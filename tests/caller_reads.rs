//! `Execution::wait` reading a handed-over execution's response on the calling
//! thread (`Config::caller_reads`), and every way the engine thread answers
//! instead: futures, callbacks, executions waited for late or never, malformed or
//! large responses, cancel, delete and the timeout while the caller reads.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, CodeToken, Config, Engine, ExecuteOptions, Metrics, Mode, Response, Result};

fn engine_reading(mode: Mode, caller_reads: bool) -> Engine {
    Engine::new(Config { mode, caller_reads, ..Default::default() }).unwrap_or_else(|e| panic!("engine in {mode:?}: {e}"))
}

/// Waits (at most 60 s) until `token` has a ready worker, so the next request is
/// handed over.
fn warm(e: &Engine, token: &CodeToken) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while e.idle_workers(token).unwrap() == 0 {
        assert!(Instant::now() < deadline, "no ready worker within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the shard finish with the previous execution (it arms the next idle
    // worker for the caller only when nothing is in flight).
    std::thread::sleep(Duration::from_millis(20));
}

fn greeting(r: Result<Response<SampleResponse>>, what: &str) -> Metrics {
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.response.greeting, "Hello, world!", "{what}");
    r.metrics
}

fn say_hello(e: &Engine, t: &CodeToken) -> roma_byob::Execution<SampleResponse> {
    e.execute::<_, SampleResponse>(t, &SampleRequest::default(), opts()).unwrap()
}

#[test]
fn wait_reads_the_response_itself_and_the_other_forms_do_not() {
    for mode in modes() {
        for caller_reads in [true, false] {
            let what = format!("{mode:?}, caller_reads {caller_reads}");
            let e = engine_reading(mode, caller_reads);
            let t = load(&e, "hello_world", 2);
            let mut by_caller = 0;
            for _ in 0..10 {
                warm(&e, &t);
                let m = greeting(say_hello(&e, &t).wait(), &what);
                by_caller += usize::from(m.read_by_caller);
            }
            if caller_reads {
                assert!(by_caller > 0, "{what}: no response of 10 was read by the calling thread");
            } else {
                assert_eq!(by_caller, 0, "{what}");
            }
            // A future and a callback never block the caller on the socket.
            warm(&e, &t);
            let m = greeting(futures_executor::block_on(say_hello(&e, &t)), &what);
            assert!(!m.read_by_caller, "{what}: future");
            warm(&e, &t);
            let (tx, rx) = mpsc::channel();
            e.execute_with_callback::<_, SampleResponse, _>(&t, &SampleRequest::default(), opts(), move |r| {
                drop(tx.send(r));
            })
            .unwrap();
            let m = greeting(rx.recv_timeout(Duration::from_secs(60)).expect("callback within 60 s"), &what);
            assert!(!m.read_by_caller, "{what}: callback");
        }
    }
}

#[test]
fn an_execution_waited_for_late_is_answered_by_the_engine_thread() {
    for mode in modes() {
        let e = engine(mode);
        // The worker answers and exits before anyone waits: the engine thread reads
        // the answer it left in the socket.
        let t = load(&e, "hello_world", 1);
        warm(&e, &t);
        let pending = say_hello(&e, &t);
        // Until the engine thread has learnt the worker's exit (its slot's new worker
        // is up): it has read the answer by then. A fixed pause could end first on a
        // starved machine, and the caller would read it.
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::sleep(Duration::from_millis(50));
        while (e.live_workers() != 1 || e.idle_workers(&t).unwrap() != 1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let m = greeting(pending.wait(), &format!("{mode:?}: waited late"));
        assert!(!m.read_by_caller, "{mode:?}");
        // The worker answers and keeps running: whoever reads, the answer arrives.
        let t = load(&e, "linger_after_response", 1);
        warm(&e, &t);
        let pending = say_hello(&e, &t);
        std::thread::sleep(Duration::from_millis(300));
        greeting(pending.wait(), &format!("{mode:?}: lingering worker"));
    }
}

#[test]
fn a_worker_that_reads_on_after_answering_sees_the_channel_close() {
    // `exit_on_eof` answers, then reads until EOF. Its channel is closed once the
    // response is read, whoever reads it (the calling thread or the engine thread),
    // so it exits at once: long before the execution's 120 s timeout, at which a
    // worker still running would be killed.
    for mode in modes() {
        for caller_reads in [true, false] {
            let what = format!("{mode:?}, caller_reads {caller_reads}");
            let e = engine_reading(mode, caller_reads);
            let t = load(&e, "exit_on_eof", 1);
            let o = ExecuteOptions { timeout: Duration::from_secs(120), ..opts() };
            for i in 0..3 {
                warm(&e, &t);
                let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), o.clone()).unwrap().wait();
                greeting(r, &format!("{what}, execution {i}"));
                // The answered worker is gone and its slot's new worker is up.
                let deadline = Instant::now() + Duration::from_secs(10);
                while (e.live_workers() != 1 || e.idle_workers(&t).unwrap() != 1) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                assert_eq!(e.live_workers(), 1, "{what}, execution {i}: the answered worker did not exit within 10 s");
            }
        }
    }
}

#[test]
fn dropped_executions_leave_no_worker_behind() {
    for mode in modes() {
        let e = engine(mode);
        let t = load(&e, "hello_world", 2);
        for _ in 0..10 {
            warm(&e, &t);
            drop(say_hello(&e, &t));
        }
        warm(&e, &t);
        greeting(say_hello(&e, &t).wait(), &format!("{mode:?}: after dropped executions"));
        // Answered and still running: the engine thread reads the answer of the
        // dropped execution, and the timeout still stops the worker.
        let lingering = load(&e, "linger_after_response", 1);
        let o = ExecuteOptions { timeout: Duration::from_secs(2), ..opts() };
        for _ in 0..3 {
            warm(&e, &lingering);
            drop(e.execute::<_, SampleResponse>(&lingering, &SampleRequest::default(), o.clone()).unwrap());
        }
        // 2 + 1 pool workers once the dropped executions' workers were killed.
        assert_eq!(wait_live(&e, 3), 3, "{mode:?}: worker processes left");
        e.delete(&t).unwrap();
        e.delete(&lingering).unwrap();
        assert_eq!(wait_live(&e, 0), 0, "{mode:?}: worker processes left after delete");
    }
}

#[test]
fn responses_in_pieces_malformed_or_large() {
    for mode in modes() {
        let e = engine(mode);
        // The length prefix, then 50 ms later the body: the caller waits for the
        // rest (and when the shard reads it, so does the shard).
        let t = load(&e, "split_response", 1);
        let mut by_caller = 0;
        for _ in 0..3 {
            warm(&e, &t);
            let m = greeting(say_hello(&e, &t).wait(), &format!("{mode:?}: split response"));
            by_caller += usize::from(m.read_by_caller);
        }
        assert!(by_caller > 0, "{mode:?}: no split response of 3 was read by the calling thread");
        // A malformed frame: the engine thread's error, not the caller's guess.
        let t = load(&e, "garbage_frame", 1);
        warm(&e, &t);
        let err = say_hello(&e, &t).wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        assert!(err.message().contains("malformed response frame"), "{mode:?}: {err}");
        // A response larger than the caller takes from the socket.
        let t = load(&e, "payload_write", 1);
        warm(&e, &t);
        let req = roma_byob::proto::sample::WritePayloadRequest { element_size: 1000, element_count: 100 };
        let r = e
            .execute::<_, roma_byob::proto::sample::WritePayloadResponse>(&t, &req, opts())
            .unwrap()
            .wait()
            .unwrap_or_else(|err| panic!("{mode:?}: {err}"));
        assert_eq!(r.response.payloads.len(), 100, "{mode:?}");
        assert!(r.response.payloads.iter().all(|p| p.len() == 1000), "{mode:?}");
        assert!(!r.metrics.read_by_caller, "{mode:?}");
    }
}

/// Starts an execution of `token` on another thread that blocks in `wait`; returns
/// its token and the channel of its result.
fn waiting(e: &std::sync::Arc<Engine>, token: &CodeToken, o: ExecuteOptions) -> (roma_byob::ExecutionToken, mpsc::Receiver<Result<Response<SampleResponse>>>) {
    warm(e, token);
    let pending = e.execute::<_, SampleResponse>(token, &SampleRequest::default(), o).unwrap();
    let id = *pending.token();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || drop(tx.send(pending.wait())));
    // The caller is reading the socket by now.
    std::thread::sleep(Duration::from_millis(200));
    (id, rx)
}

#[test]
fn cancel_delete_and_the_timeout_wake_a_caller_that_reads() {
    for mode in modes() {
        let e = std::sync::Arc::new(engine(mode));
        let t = load(&e, "never_answer", 1);
        let (id, rx) = waiting(&e, &t, opts());
        let cancelled = Instant::now();
        e.cancel(&id).unwrap();
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("cancel ends the wait").unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{mode:?}: {err}");
        eprintln!("{mode:?}: cancel reached the waiting caller after {:?}", cancelled.elapsed());

        let o = ExecuteOptions { timeout: Duration::from_millis(600), ..opts() };
        let (_, rx) = waiting(&e, &t, o);
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the timeout ends the wait").unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{mode:?}: {err}");

        let (_, rx) = waiting(&e, &t, opts());
        e.delete(&t).unwrap();
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("delete ends the wait").unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{mode:?}: {err}");
        assert!(err.message().contains("deleted"), "{mode:?}: {err}");
        assert_eq!(wait_live(&e, 0), 0, "{mode:?}: worker processes left after delete");
    }
}
