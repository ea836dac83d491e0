//! Shared-memory transport: payloads both ways, no residue between workers, clear
//! errors for requests that do not fit. In every available mode.

mod common;

use common::*;
use roma_byob::proto::sample::{
    ProbeRequest, ProbeResponse, ReadPayloadRequest, ReadPayloadResponse, WritePayloadRequest, WritePayloadResponse,
};
use roma_byob::{Code, LoadOptions};

fn shm_load(e: &roma_byob::Engine, name: &str, region: usize) -> roma_byob::CodeToken {
    e.load(sample(name), LoadOptions { workers: 1, shared_memory: Some(region), ..Default::default() }).unwrap()
}

#[test]
fn payloads_travel_through_shared_memory() {
    for mode in modes() {
        let e = engine(mode);
        let read = shm_load(&e, "payload_read", 16 << 20);
        let req = ReadPayloadRequest { payloads: vec![vec![7u8; 10 << 20], vec![1u8; 3]] };
        let r = e.execute::<_, ReadPayloadResponse>(&read, &req, opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.payload_size, (10 << 20) + 3);

        let write = shm_load(&e, "payload_write", 16 << 20);
        let req = WritePayloadRequest { element_size: 1 << 20, element_count: 5 };
        let r = e.execute::<_, WritePayloadResponse>(&write, &req, opts()).unwrap().wait().unwrap();
        assert_eq!(r.response.payloads.len(), 5);
        assert!(r.response.payloads.iter().all(|p| p.len() == 1 << 20 && p.iter().all(|&b| b == b'a')));
        // Several in a row: each on a fresh worker and region.
        for _ in 0..3 {
            let r = e
                .execute::<_, WritePayloadResponse>(&write, &WritePayloadRequest { element_size: 10, element_count: 2 }, opts())
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(r.response.payloads, vec![b"aaaaaaaaaa".to_vec(); 2]);
        }
    }
}

/// `WritePayloadResponse` with `Bytes` payloads (prost-build's `.bytes(..)`):
/// decoding shares the response instead of copying it.
#[derive(Clone, PartialEq, prost::Message)]
struct SharedPayloads {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    payloads: Vec<prost::bytes::Bytes>,
}

#[test]
fn large_responses_are_shared_out_of_the_region_and_stay_intact() {
    for mode in modes() {
        let e = engine(mode);
        let region = 48 << 20;
        let write = shm_load(&e, "payload_write", region);
        let probe = shm_load(&e, "probe", region);
        // 40 MiB: large enough to be handed over from the region without a copy.
        let big = WritePayloadRequest { element_size: 10 << 20, element_count: 4 };
        let held = e.execute::<_, SharedPayloads>(&write, &big, opts()).unwrap().wait().unwrap().response;
        assert_eq!(held.payloads.len(), 4);
        // The same response decoded into the generated (`Vec<u8>`) type.
        let copied = e.execute::<_, WritePayloadResponse>(&write, &big, opts()).unwrap().wait().unwrap().response;
        assert!(copied.payloads.iter().all(|p| p.len() == 10 << 20 && p.iter().all(|&b| b == b'a')));
        drop(copied);
        // While `held` lives its region is neither wiped nor given to another worker,
        // however many executions of this region size come and go.
        for _ in 0..6 {
            let r = e
                .execute::<_, ProbeResponse>(&probe, &ProbeRequest { probe: "shm_fill".into(), arg: String::new() }, opts())
                .unwrap()
                .wait()
                .unwrap();
            assert!(r.response.result.starts_with("filled"), "{}", r.response.result);
            let again = e.execute::<_, SharedPayloads>(&write, &big, opts()).unwrap().wait().unwrap().response;
            assert_eq!(again.payloads.iter().map(|p| p.len()).sum::<usize>(), 40 << 20);
        }
        assert!(
            held.payloads.iter().all(|p| p.len() == 10 << 20 && p.iter().all(|&b| b == b'a')),
            "{mode:?}: a response still held by the caller changed"
        );
        drop(held);
        // And once dropped, nothing of it (or of the scribbles) reaches a worker.
        for _ in 0..6 {
            let req = ProbeRequest { probe: "shm_residue".into(), arg: String::new() };
            let r = e.execute::<_, ProbeResponse>(&probe, &req, opts()).unwrap().wait().unwrap().response.result;
            assert!(r.starts_with("clean"), "{mode:?}: a later worker sees {r}");
        }
    }
}

#[test]
fn no_byte_of_one_request_reaches_the_next_worker() {
    for mode in modes() {
        let e = engine(mode);
        let t = shm_load(&e, "probe", 1 << 20);
        let run = |probe: &str| {
            let req = ProbeRequest { probe: probe.into(), arg: "secret".into() };
            e.execute::<_, ProbeResponse>(&t, &req, opts()).unwrap().wait().unwrap().response.result
        };
        let filled = run("shm_fill");
        assert!(filled.starts_with("filled"), "the first worker scribbles over its region: {filled}");
        // Shrinking the region under the host's mapping would crash the host (SIGBUS):
        // the region is sealed.
        assert_eq!(run("shm_truncate"), "EPERM", "{mode:?}");
        for _ in 0..3 {
            let r = run("shm_residue");
            assert!(r.starts_with("clean"), "{mode:?}: the next worker sees {r}");
        }
        // Regions are reused once wiped: keep going until a worker gets the very
        // region the first one scribbled over (same memfd inode) — it must read
        // all zeroes too. (gVisor numbers inodes itself: there only "clean" counts.)
        let inode = |r: &str| r.rsplit(' ').next().map(str::to_string);
        let scribbled = inode(&filled);
        let mut reused = false;
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let r = run("shm_residue");
            assert!(r.starts_with("clean"), "{mode:?}: a later worker sees {r}");
            if inode(&r) == scribbled {
                reused = true;
                break;
            }
        }
        if mode == roma_byob::Mode::Minimal {
            assert!(reused, "the scribbled region was never handed to another worker: the wipe went untested");
        }
    }
}

/// Below `untrusted` a worker could hand its region's fd to another worker, which
/// could then read whatever the region carries next: there regions are never reused.
#[test]
fn regions_are_not_reused_where_workers_could_pass_fds_on() {
    let mode = roma_byob::Mode::Minimal;
    let e = engine_with(mode, roma_byob::SyscallFilter::WorkerEngine);
    let t = shm_load(&e, "probe", 1 << 20);
    let run = |probe: &str| {
        let req = ProbeRequest { probe: probe.into(), arg: String::new() };
        e.execute::<_, ProbeResponse>(&t, &req, opts()).unwrap().wait().unwrap().response.result
    };
    let inode = |r: &str| r.rsplit(' ').next().map(str::to_string);
    let filled = run("shm_fill");
    assert!(filled.starts_with("filled"), "{filled}");
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = run("shm_residue");
        assert!(r.starts_with("clean"), "a later worker sees {r}");
        assert_ne!(inode(&r), inode(&filled), "a region was reused at level worker-engine");
    }
}

#[test]
fn oversized_requests_and_regions_are_refused_clearly() {
    for mode in modes() {
        let e = engine(mode);
        let t = shm_load(&e, "payload_read", 1 << 16);
        let req = ReadPayloadRequest { payloads: vec![vec![0u8; 1 << 17]] };
        let err = e.execute::<_, ReadPayloadResponse>(&t, &req, opts()).err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("does not fit"), "{err}");
        // The token still works for requests that fit.
        let ok = ReadPayloadRequest { payloads: vec![vec![0u8; 100]] };
        assert_eq!(e.execute::<_, ReadPayloadResponse>(&t, &ok, opts()).unwrap().wait().unwrap().response.payload_size, 100);

        let err = e
            .load(sample("payload_read"), LoadOptions { workers: 1, shared_memory: Some(10), ..Default::default() })
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // A response larger than the region fails the execution, not the engine.
        let w = shm_load(&e, "payload_write", 1 << 16);
        let big = WritePayloadRequest { element_size: 1 << 17, element_count: 1 };
        let err = e.execute::<_, WritePayloadResponse>(&w, &big, opts()).unwrap().wait().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }
}
