//! Request and response payloads from 1 B to 50 MiB (Roma BYOB's payload benchmarks),
//! through the socket (the plain Roma protocol) and through the shared-memory
//! transport (`LoadOptions::shared_memory`).
//!
//! - `payload_request`: `payload_read` gets `ReadPayloadRequest{payloads: count x size}`;
//! - `payload_response`: `payload_write` answers `element_count` payloads of
//!   `element_size` bytes.
//!
//! Responses are decoded into the generated `WritePayloadResponse` (`Vec<u8>` payloads:
//! one copy each, into memory the allocator hands out) and, as `shm-bytes`, into the
//! same message with `Bytes` payloads (prost-build's `.bytes(..)`), which shares the
//! response instead: with the shared-memory transport a large response is then never
//! copied on the host.
//!
//! Reported as bytes/s. gVisor runs only with ROMA_BENCH_GVISOR=1. If the shared-memory
//! transport fails (not available in this build, or the UDF does not support it), its
//! groups are skipped with the error printed.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roma_byob::proto::sample::{ReadPayloadRequest, ReadPayloadResponse, WritePayloadRequest, WritePayloadResponse};
use roma_byob::{CodeToken, Engine};

use common::{Latency, ModeCase, Warmup};

const WORKERS: usize = 10;
/// Shared-memory region per worker: fits the 50 MiB case plus framing.
const SHM_BYTES: usize = 64 << 20;
/// (element size, element count): 1 B up to 50 MiB in total.
const CASES: [(usize, usize); 6] = [(1, 1), (1 << 10, 1), (1 << 10, 1000), (1 << 20, 1), (1 << 20, 10), (10 << 20, 5)];

#[derive(Clone, Copy)]
enum Transport {
    Socket,
    SharedMemory,
    /// Shared memory, response decoded with `Bytes` payloads (responses only).
    SharedMemoryBytes,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Socket => "socket",
            Transport::SharedMemory => "shm",
            Transport::SharedMemoryBytes => "shm-bytes",
        }
    }
    fn option(self) -> Option<usize> {
        match self {
            Transport::Socket => None,
            Transport::SharedMemory | Transport::SharedMemoryBytes => Some(SHM_BYTES),
        }
    }
}

/// `WritePayloadResponse` as prost-build generates it with `.bytes(["."])`.
#[derive(Clone, PartialEq, prost::Message)]
struct WritePayloadResponseShared {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    payloads: Vec<prost::bytes::Bytes>,
}

/// Bytes in a decoded response, whichever way its payloads are held.
trait PayloadBytes: prost::Message + Default {
    fn total(&self) -> usize;
}

impl PayloadBytes for WritePayloadResponse {
    fn total(&self) -> usize {
        self.payloads.iter().map(Vec::len).sum()
    }
}

impl PayloadBytes for WritePayloadResponseShared {
    fn total(&self) -> usize {
        self.payloads.iter().map(|p| p.len()).sum()
    }
}

fn execute_write<R: PayloadBytes>(
    engine: &Engine,
    token: &CodeToken,
    req: &WritePayloadRequest,
    lat: &mut Latency,
) -> Result<(usize, std::time::Duration), String> {
    common::execute_once::<_, R>(engine, token, req, lat).map(|(r, d)| (r.total(), d))
}

fn read_request(size: usize, count: usize) -> ReadPayloadRequest {
    ReadPayloadRequest { payloads: vec![vec![b'a'; size]; count] }
}

/// Loads `udf` for `transport` and checks it with the smallest case; `None` (with the
/// reason printed) when that fails, so the caller skips the group.
fn prepare(engine: &Engine, mc: ModeCase, udf: &str, transport: Transport) -> Option<CodeToken> {
    let path = common::sample(udf)?;
    let what = format!("{}/{}/{udf}", mc.name(), transport.name());
    let token = match common::load(engine, &path, WORKERS, transport.option()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIP {what}: {e}");
            return None;
        }
    };
    let mut lat = Latency::new();
    let check = if udf == "payload_read" {
        common::execute_once::<_, ReadPayloadResponse>(engine, &token, &read_request(1, 1), &mut lat)
            .and_then(|(r, _)| if r.payload_size == 1 { Ok(()) } else { Err(format!("payload_size {}, expected 1", r.payload_size)) })
    } else {
        let req = WritePayloadRequest { element_size: 1, element_count: 1 };
        common::execute_once::<_, WritePayloadResponse>(engine, &token, &req, &mut lat)
            .and_then(|(r, _)| if r.payloads.len() == 1 { Ok(()) } else { Err(format!("{} payloads, expected 1", r.payloads.len())) })
    };
    match check {
        Ok(()) => Some(token),
        Err(e) => {
            eprintln!("SKIP {what}: an execution with this transport failed: {e}");
            let _ = engine.delete(&token);
            None
        }
    }
}

fn bench_payloads(c: &mut Criterion) {
    for mc in common::modes() {
        if !mc.full {
            eprintln!("SKIP payload benchmarks in {} mode: set {}=1 to run them", mc.name(), common::GVISOR_ENV);
            continue;
        }
        let Some(engine) = common::engine(mc.mode) else { continue };
        for transport in [Transport::Socket, Transport::SharedMemory, Transport::SharedMemoryBytes] {
            let prefix = format!("{}/{}", mc.name(), transport.name());
            let requests = !matches!(transport, Transport::SharedMemoryBytes);

            if let Some(token) = requests.then(|| prepare(&engine, mc, "payload_read", transport)).flatten() {
                let warm = Warmup::new(mc.mode, WORKERS);
                let mut group = c.benchmark_group("payload_request");
                for (size, count) in CASES {
                    let total = size * count;
                    let req = read_request(size, count);
                    let param = format!("{} x {count}", common::bytes_label(size));
                    let mut lat = Latency::new();
                    group.throughput(Throughput::Bytes(total as u64));
                    group.bench_function(BenchmarkId::new(&prefix, &param), |b| {
                        warm.ensure();
                        b.iter_custom(|iters| {
                            let mut t = std::time::Duration::ZERO;
                            for _ in 0..iters {
                                match common::execute_once::<_, ReadPayloadResponse>(&engine, &token, &req, &mut lat) {
                                    Ok((r, d)) if r.payload_size == total as u64 => t += d,
                                    Ok((r, _)) => panic!("{prefix}/{param}: payload_size {} != {total}", r.payload_size),
                                    Err(e) => panic!("{prefix}/{param}: {e}"),
                                }
                            }
                            t
                        })
                    });
                    lat.print(&format!("payload_request/{prefix}/{param}"));
                }
                group.finish();
                let _ = engine.delete(&token);
            }

            if let Some(token) = prepare(&engine, mc, "payload_write", transport) {
                let warm = Warmup::new(mc.mode, WORKERS);
                let mut group = c.benchmark_group("payload_response");
                for (size, count) in CASES {
                    let total = size * count;
                    let req = WritePayloadRequest { element_size: size as u64, element_count: count as u64 };
                    let param = format!("{} x {count}", common::bytes_label(size));
                    let mut lat = Latency::new();
                    group.throughput(Throughput::Bytes(total as u64));
                    group.bench_function(BenchmarkId::new(&prefix, &param), |b| {
                        warm.ensure();
                        b.iter_custom(|iters| {
                            let mut t = std::time::Duration::ZERO;
                            for _ in 0..iters {
                                let done = match transport {
                                    Transport::SharedMemoryBytes => {
                                        execute_write::<WritePayloadResponseShared>(&engine, &token, &req, &mut lat)
                                    }
                                    _ => execute_write::<WritePayloadResponse>(&engine, &token, &req, &mut lat),
                                };
                                match done {
                                    Ok((got, d)) => {
                                        assert_eq!(got, total, "{prefix}/{param}: response bytes");
                                        t += d;
                                    }
                                    Err(e) => panic!("{prefix}/{param}: {e}"),
                                }
                            }
                            t
                        })
                    });
                    lat.print(&format!("payload_response/{prefix}/{param}"));
                }
                group.finish();
                let _ = engine.delete(&token);
            }
        }
        engine.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_payloads
}
criterion_main!(benches);
