//! Hand-over (`Config::hand_over`): the calling thread writes a request to a ready
//! worker itself. A request larger than one non-blocking `send` takes is finished by
//! the engine thread. In every available mode.

mod common;

use common::*;
use roma_byob::proto::sample::{ReadPayloadRequest, ReadPayloadResponse};
use roma_byob::{CodeToken, Config, Engine};

/// Pauses before each attempt: see the first test.
const PAUSES_MS: [u64; 4] = [50, 200, 1000, 3000];

/// Runs a `payload_read` request with `payloads` once the pool of 2 has refilled
/// and after a pause, again after each longer pause of `pauses_ms` while it is not
/// handed over; checks every answer. Returns whether one was handed over.
fn handed_over_after_pauses(e: &Engine, t: &CodeToken, payloads: Vec<Vec<u8>>, pauses_ms: &[u64]) -> bool {
    let size: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    let req = ReadPayloadRequest { payloads };
    for &pause_ms in pauses_ms {
        wait_idle(e, t, 2);
        std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        let r = e.execute::<_, ReadPayloadResponse>(t, &req, opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.payload_size, size);
        if r.metrics.handed_over {
            return true;
        }
    }
    false
}

#[test]
fn requests_larger_than_the_socket_buffer_are_finished_by_the_engine_thread() {
    for mode in modes() {
        let e = Engine::new(Config { mode, hand_over_max_bytes: 16 << 20, ..Default::default() }).unwrap();
        let t = load(&e, "payload_read", 2);
        for size in [1usize, 100 << 10, 4 << 20, 10 << 20] {
            // Let the pool refill, so that a ready worker can be handed the request:
            // both workers idle (slow in gVisor on a loaded machine), then a pause:
            // with `Config::lazy_readiness` a worker is offered, and counted idle,
            // before its ready byte arrives, and a request that claims it then is
            // queued for the engine thread, not handed over. A gVisor worker on a
            // loaded machine may take longer than one pause to write that byte, so
            // the pause grows over a few attempts; every answer is checked.
            let payloads = vec![vec![3u8; size], vec![1u8; 7]];
            assert!(handed_over_after_pauses(&e, &t, payloads, &PAUSES_MS), "{mode:?}: the {size}-byte request was not handed over");
        }
    }
}

#[test]
fn requests_above_the_limit_go_through_the_engine_thread() {
    let e = Engine::new(Config { hand_over_max_bytes: 1000, ..Default::default() }).unwrap();
    let t = load(&e, "payload_read", 2);
    // Under the limit: handed over once a worker is ready (the pause grows as in the
    // first test: a starved machine may not have the ready byte within 50 ms).
    assert!(handed_over_after_pauses(&e, &t, vec![vec![3u8; 10]], &PAUSES_MS), "10 bytes");
    // Over it: never, however long the pause.
    assert!(!handed_over_after_pauses(&e, &t, vec![vec![3u8; 5000]], &PAUSES_MS[..1]), "5000 bytes");
}
