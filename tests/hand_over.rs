//! Hand-over (`Config::hand_over`): the calling thread writes a request to a ready
//! worker itself. A request larger than one non-blocking `send` takes is finished by
//! the engine thread. In every available mode.

mod common;

use common::*;
use roma_byob::proto::sample::{ReadPayloadRequest, ReadPayloadResponse};
use roma_byob::{Config, Engine};

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
            let mut handed = false;
            for pause_ms in [50, 200, 1000, 3000] {
                wait_idle(&e, &t, 2);
                std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                let req = ReadPayloadRequest { payloads: vec![vec![3u8; size], vec![1u8; 7]] };
                let r = e.execute::<_, ReadPayloadResponse>(&t, &req, opts()).unwrap().wait().unwrap();
                assert_eq!(r.response.payload_size, size as u64 + 7, "{mode:?}");
                if r.metrics.handed_over {
                    handed = true;
                    break;
                }
            }
            assert!(handed, "{mode:?}: the {size}-byte request was not handed over");
        }
    }
}

#[test]
fn requests_above_the_limit_go_through_the_engine_thread() {
    let e = Engine::new(Config { hand_over_max_bytes: 1000, ..Default::default() }).unwrap();
    let t = load(&e, "payload_read", 2);
    for (size, handed) in [(10usize, true), (5000, false)] {
        wait_idle(&e, &t, 2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let req = ReadPayloadRequest { payloads: vec![vec![3u8; size]] };
        let r = e.execute::<_, ReadPayloadResponse>(&t, &req, opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.payload_size, size as u64);
        assert_eq!(r.metrics.handed_over, handed, "{size} bytes");
    }
}
