//! The example UDFs (sdk_hello, sdk_callbacks, sdk_payload) run in the real engine,
//! in every available mode, on the socket and the shared-memory transport.

mod common;

use common::pb::sample::*;
use common::*;
use roma_byob::{Code, Engine, LoadOptions};

const HELLO: &str = env!("CARGO_BIN_EXE_sdk_hello");
const CALLBACKS: &str = env!("CARGO_BIN_EXE_sdk_callbacks");
const PAYLOAD: &str = env!("CARGO_BIN_EXE_sdk_payload");

#[test]
fn hello_on_both_transports() {
    for mode in modes() {
        let e = engine(mode);
        for shm in TRANSPORTS {
            let t = load(&e, HELLO, LoadOptions { workers: 2, shared_memory: shm, ..Default::default() });
            for _ in 0..3 {
                let done =
                    e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
                assert_eq!(done.response.greeting, "Hello from the Rust SDK!", "{mode:?} shm={shm:?}");
            }
        }
    }
}

#[test]
fn hello_writes_nothing_to_its_logs() {
    let e = engine(roma_byob::Mode::Minimal);
    let t = load(&e, HELLO, LoadOptions { workers: 1, log_egress: true, ..Default::default() });
    let done = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
    let logs = done.logs.unwrap();
    assert!(logs.stdout.is_empty() && logs.stderr.is_empty(), "{logs:?}");
}

fn callbacks(e: &Engine, t: &roma_byob::CodeToken, functions: &[&str], payload: &str) -> Vec<String> {
    let req = CallbackRequest { functions: functions.iter().map(|s| s.to_string()).collect(), payload: payload.into() };
    let mut o = opts();
    o.metadata.insert("tenant".into(), "acme".into());
    e.execute::<_, CallbackResponse>(t, &req, o).unwrap().wait().unwrap().response.results
}

#[test]
fn callbacks_same_semantics_as_the_c_udf() {
    for mode in modes() {
        let e = engine(mode);
        host_functions::register_test_functions(&e);
        for shm in TRANSPORTS {
            let t = load(&e, CALLBACKS, host_api(2, shm));
            let results = callbacks(
                &e,
                &t,
                &["test.Echo", "test.Missing", "test.Fail", "test.Panic", "test.Async", "test.Meta"],
                "hi",
            );
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
                "{mode:?} shm={shm:?}"
            );
            // Many calls in flight, several executions in a row.
            for i in 0..3 {
                assert_eq!(callbacks(&e, &t, &["test.Echo"; 20], &format!("n{i}")), vec![format!("ok:pong:n{i}"); 20]);
            }
            // No call at all: the plain Roma protocol.
            assert!(callbacks(&e, &t, &[], "").is_empty());
        }
    }
}

#[test]
fn callbacks_without_the_opt_in_get_error_replies() {
    let e = engine(roma_byob::Mode::Minimal);
    host_functions::register_test_functions(&e);
    let t = load(&e, CALLBACKS, LoadOptions::default());
    let results = callbacks(&e, &t, &["test.Echo"], "x");
    assert!(results[0].starts_with("error:the host API is not enabled"), "{results:?}");
}

#[test]
fn payloads_on_both_transports() {
    for mode in modes() {
        let e = engine(mode);
        for shm in [None, Some(8 << 20)] {
            let t = load(&e, PAYLOAD, LoadOptions { workers: 1, shared_memory: shm, ..Default::default() });
            for (count, size) in [(0usize, 0usize), (1, 1), (3, 1000), (4, 1 << 20)] {
                let req = ReadPayloadRequest { payloads: vec![vec![b'a'; size]; count] };
                let done = e.execute::<_, ReadPayloadResponse>(&t, &req, opts()).unwrap().wait().unwrap();
                assert_eq!(done.response.payload_size, (count * size) as u64, "{mode:?} shm={shm:?}");
            }
        }
    }
}

#[test]
fn a_malformed_request_fails_the_execution_with_the_sdk_message() {
    let e = engine(roma_byob::Mode::Minimal);
    let t = load(&e, PAYLOAD, LoadOptions { workers: 1, log_egress: true, ..Default::default() });
    // Field 1 declared as 100 bytes long with 1 byte present: does not decode.
    let err = e.execute_raw(&t, &[0x0a, 100, 1], opts()).unwrap().wait().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("exited with status 1"), "{err}");
}
