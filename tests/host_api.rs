//! Host API callbacks: several calls in flight per execution, sync and async
//! handlers, metadata, unknown functions, handler errors and panics, tokens without
//! the opt-in, and the shared-memory transport. In every available mode.

mod common;

use std::collections::HashMap;

use common::*;
use roma_byob::proto::sample::{CallbackRequest, CallbackResponse};
use roma_byob::{Engine, ExecuteOptions, LoadOptions};

fn call(e: &Engine, t: &roma_byob::CodeToken, functions: &[&str], payload: &str) -> Vec<String> {
    let req = CallbackRequest { functions: functions.iter().map(|s| s.to_string()).collect(), payload: payload.into() };
    let mut o = opts();
    o.metadata = HashMap::from([("tenant".to_string(), "acme".to_string())]);
    e.execute::<_, CallbackResponse>(t, &req, o).unwrap().wait().unwrap().response.results
}

#[test]
fn host_calls_in_flight_with_every_outcome() {
    for mode in modes() {
        let e = engine(mode);
        host_functions::register_test_functions(&e);
        let t = e.load(sample("callback_udf"), LoadOptions { workers: 2, host_api: true, ..Default::default() }).unwrap();
        let results = call(&e, &t, &["test.Echo", "test.Missing", "test.Fail", "test.Panic", "test.Async", "test.Meta"], "hi");
        assert_eq!(
            results,
            vec![
                "ok:pong:hi".to_string(),
                "error:unknown host function \"test.Missing\"".to_string(),
                "error:no such key".to_string(),
                "error:host function \"test.Panic\" panicked".to_string(),
                format!("ok:async:hi:{t}"),
                "ok:acme".to_string(),
            ],
            "{mode:?}"
        );
        // Ten calls in flight, several executions in a row: the engine keeps serving.
        let ten = vec!["test.Echo"; 10];
        for i in 0..3 {
            let results = call(&e, &t, &ten, &format!("n{i}"));
            assert_eq!(results, vec![format!("ok:pong:n{i}"); 10]);
        }
        // An execution with no call at all still works (plain Roma protocol).
        assert!(call(&e, &t, &[], "").is_empty());
        // Unregistered functions become unknown.
        e.unregister_host_function("test.Echo").unwrap();
        assert_eq!(call(&e, &t, &["test.Echo"], "x"), vec!["error:unknown host function \"test.Echo\"".to_string()]);
        assert!(e.register_host_function("test.Meta", |_, _| Ok(Vec::new())).is_err(), "duplicate names are refused");
    }
}

#[test]
fn host_calls_need_the_opt_in() {
    for mode in modes() {
        let e = engine(mode);
        host_functions::register_test_functions(&e);
        let t = load(&e, "callback_udf", 1);
        let results = call(&e, &t, &["test.Echo"], "x");
        assert_eq!(results.len(), 1);
        assert!(results[0].starts_with("error:the host API is not enabled"), "{results:?}");
    }
}

#[test]
fn host_calls_work_with_the_shared_memory_transport() {
    for mode in modes() {
        let e = engine(mode);
        host_functions::register_test_functions(&e);
        let t = e
            .load(
                sample("callback_udf"),
                LoadOptions { workers: 1, host_api: true, shared_memory: Some(1 << 20), ..Default::default() },
            )
            .unwrap();
        assert_eq!(call(&e, &t, &["test.Echo", "test.Async"], "shm"), vec!["ok:pong:shm".to_string(), format!("ok:async:shm:{t}")]);
    }
}

#[test]
fn a_slow_handler_does_not_block_other_executions() {
    let e = engine(roma_byob::Mode::Minimal);
    e.register_host_function("test.Slow", |_, _| {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        Ok(b"late".to_vec())
    })
    .unwrap();
    host_functions::register_test_functions(&e);
    let t = e.load(sample("callback_udf"), LoadOptions { workers: 2, host_api: true, ..Default::default() }).unwrap();
    let req = CallbackRequest { functions: vec!["test.Slow".into()], payload: Vec::new() };
    let slow = e.execute::<_, CallbackResponse>(&t, &req, ExecuteOptions::default()).unwrap();
    // Meanwhile another execution with a quick call completes.
    assert_eq!(call(&e, &t, &["test.Echo"], "fast"), vec!["ok:pong:fast".to_string()]);
    assert_eq!(slow.wait().unwrap().response.results, vec!["ok:late".to_string()]);
}

#[test]
fn a_udf_cannot_pile_up_unbounded_host_calls() {
    let e = engine(roma_byob::Mode::Minimal);
    e.register_host_function("test.Slow", |_, _| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        Ok(Vec::new())
    })
    .unwrap();
    host_functions::register_test_functions(&e);
    let t = e.load(sample("callback_udf"), LoadOptions { workers: 1, host_api: true, ..Default::default() }).unwrap();
    let req = CallbackRequest { functions: vec!["test.Slow".into(); 600], payload: Vec::new() };
    let err = e.execute::<_, CallbackResponse>(&t, &req, opts()).unwrap().wait().unwrap_err();
    assert_eq!(err.code(), roma_byob::Code::Unavailable, "{err}");
    assert!(err.message().contains("host calls in flight"), "{err}");
    // The engine and the token keep serving.
    assert_eq!(call(&e, &t, &["test.Echo"], "after"), vec!["ok:pong:after".to_string()]);
}

/// Every execution runs exactly once, whether the calling thread hands the request
/// to a ready worker itself (`Config::hand_over`) or the engine thread sends it, and
/// also when the UDF crashes after its host call: a host function counts the runs.
#[test]
fn each_execution_runs_exactly_once_even_when_the_udf_crashes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for mode in modes() {
        for hand_over in [true, false] {
            let e = Engine::new(roma_byob::Config { mode, hand_over, ..Default::default() }).unwrap();
            let runs = Arc::new(AtomicUsize::new(0));
            let counter = runs.clone();
            e.register_host_function("test.Count", move |_, _| {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(b"counted".to_vec())
            })
            .unwrap();
            let t = e.load(sample("callback_udf"), LoadOptions { workers: 2, host_api: true, ..Default::default() }).unwrap();
            let rounds = 12;
            let mut handed = 0;
            for i in 0..rounds {
                // Let the pool refill, so that a ready worker can be handed the request.
                std::thread::sleep(std::time::Duration::from_millis(20));
                let payload = if i % 3 == 2 { "abort" } else { "x" };
                let req = CallbackRequest { functions: vec!["test.Count".into()], payload: payload.into() };
                let got = e.execute::<_, CallbackResponse>(&t, &req, opts()).unwrap().wait();
                assert_eq!(runs.load(Ordering::SeqCst), i + 1, "{mode:?} hand_over {hand_over}: runs after execution {i}");
                match got {
                    Ok(r) => {
                        assert_eq!(payload, "x", "{mode:?}");
                        assert_eq!(r.response.results, vec!["ok:counted".to_string()]);
                        handed += usize::from(r.metrics.handed_over);
                    }
                    Err(err) => {
                        assert_eq!(payload, "abort", "{mode:?}: {err}");
                        assert_eq!(err.code(), roma_byob::Code::Unavailable, "{err}");
                        assert!(err.to_string().contains("was killed by signal"), "{err}");
                    }
                }
            }
            if hand_over {
                assert!(handed > 0, "{mode:?}: no request was handed over");
            } else {
                assert_eq!(handed, 0, "{mode:?}: handed over with hand_over off");
            }
        }
    }
}
