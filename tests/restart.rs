//! A sandbox that dies (its top process killed) fails the in-flight executions with
//! `Unavailable`, except requests written to workers that had not signalled
//! readiness yet (`Config::early_dispatch`), which are queued again; the engine
//! restarts it, re-creates every code token's workers, and later executions succeed.

mod common;

use std::time::Duration;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, ExecuteOptions};

#[test]
fn killed_sandbox_is_restarted_and_tokens_work_again() {
    for mode in modes() {
        let e = engine(mode);
        let hang = load(&e, "never_answer", 1);
        let hello_token = load(&e, "hello_world", 2);
        assert_eq!(hello(&e, &hello_token).unwrap(), "Hello, world!");
        // The hanging worker started (offered, then time to write its ready byte):
        // the execution runs on it rather than waiting in the queue, where it would
        // outlive the sandbox's death and end at its timeout instead.
        wait_idle(&e, &hang, 1);
        std::thread::sleep(Duration::from_millis(500));
        let in_flight = e.execute::<_, SampleResponse>(&hang, &SampleRequest::default(), opts()).unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let pid = e.sandbox_pid();
        // SAFETY: signalling the engine's own child process.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);

        let err = in_flight.wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err}");
        // "Later" executions: once the supervisor has started the new sandbox (an
        // execution racing the death itself may still land on a dying worker).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while e.sandbox_pid() == pid && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }

        let patient = ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), ..opts() };
        let r = e
            .execute::<_, SampleResponse>(&hello_token, &SampleRequest::default(), patient.clone())
            .unwrap()
            .wait()
            .unwrap_or_else(|err| panic!("{mode:?}: after the restart: {err}"));
        assert_eq!(r.response.greeting, "Hello, world!");
        assert_ne!(e.sandbox_pid(), pid, "a new sandbox process");

        // The other token got its worker back too: it takes the request (and times
        // out), rather than finding no worker.
        let o = ExecuteOptions { timeout: Duration::from_millis(300), ..patient };
        let err = e.execute::<_, SampleResponse>(&hang, &SampleRequest::default(), o).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(err.message().contains("timeout"), "{err}");

        // New loads work on the restarted sandbox.
        let fresh = load(&e, "new_udf", 1);
        assert_eq!(hello(&e, &fresh).unwrap(), "I am a new UDF!");
    }
}

#[test]
fn a_request_written_to_a_worker_still_starting_survives_the_sandboxs_death() {
    for mode in modes() {
        let e = engine(mode);
        // One slow_ready worker (300 ms before its ready byte) and three requests:
        // when the first is done, its slot's new worker is spawned and the second
        // request written to it at once (`Config::early_dispatch`); the sandbox dies
        // 100 ms later, while that worker still sleeps before its ready byte.
        let t = load(&e, "slow_ready", 1);
        let patient = ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), ..opts() };
        let runs: Vec<_> =
            (0..3).map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), patient.clone()).unwrap()).collect();
        let mut runs = runs.into_iter();
        let first = runs.next().unwrap().wait().unwrap_or_else(|err| panic!("{mode:?}: first request: {err}"));
        assert_eq!(first.response.greeting, "Hello, world!");
        std::thread::sleep(Duration::from_millis(100));
        let pid = e.sandbox_pid();
        // SAFETY: signalling the engine's own child process.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        // The worker never signalled readiness, so it never read the request: the
        // request goes back to its queue and runs in the restarted sandbox, as a
        // request still queued does, instead of failing with the dead worker.
        for (i, run) in runs.enumerate() {
            let r = run.wait().unwrap_or_else(|err| panic!("{mode:?}: request {} after the sandbox's death: {err}", i + 2));
            assert_eq!(r.response.greeting, "Hello, world!");
        }
        assert_ne!(e.sandbox_pid(), pid, "{mode:?}: a new sandbox process");
    }
}
