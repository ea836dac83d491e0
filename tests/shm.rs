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

#[test]
fn no_byte_of_one_request_reaches_the_next_worker() {
    for mode in modes() {
        let e = engine(mode);
        let t = shm_load(&e, "probe", 1 << 20);
        let run = |probe: &str| {
            let req = ProbeRequest { probe: probe.into(), arg: "secret".into() };
            e.execute::<_, ProbeResponse>(&t, &req, opts()).unwrap().wait().unwrap().response.result
        };
        assert!(run("shm_fill").starts_with("filled"), "the first worker scribbles over its region");
        // Shrinking the region under the host's mapping would crash the host (SIGBUS):
        // the region is sealed.
        assert_eq!(run("shm_truncate"), "EPERM", "{mode:?}");
        for _ in 0..3 {
            let r = run("shm_residue");
            assert!(r.starts_with("clean"), "{mode:?}: the next worker sees {r}");
        }
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
