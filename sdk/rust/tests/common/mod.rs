//! Shared helpers: every test runs in each sandbox mode available on this machine,
//! against the example UDFs of this crate (src/bin), built by cargo for the tests.
#![allow(dead_code)]

#[path = "../../../../tests/common/host_functions.rs"]
pub mod host_functions;

use std::path::{Path, PathBuf};
use std::time::Duration;

use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, LoadOptions, Mode};

/// Generated host-side code (build.rs): messages and typed clients/registrations.
pub mod pb {
    pub mod sample {
        include!(concat!(env!("OUT_DIR"), "/host/roma_byob.sample.rs"));
    }
    pub mod kv {
        include!(concat!(env!("OUT_DIR"), "/host/roma_byob.kv.rs"));
    }
    pub mod round_trip {
        include!(concat!(env!("OUT_DIR"), "/host/roma_byob.round_trip.rs"));
    }
}

/// The modes these tests run in: `minimal` always, `gvisor` when runsc is installed
/// (a visible skip line otherwise).
pub fn modes() -> Vec<Mode> {
    let mut v = vec![Mode::Minimal];
    if which("runsc").is_some() || Path::new("/usr/bin/runsc").is_file() {
        v.push(Mode::Gvisor);
    } else {
        eprintln!("SKIP gvisor mode: runsc is not installed (apt-get install -y runsc)");
    }
    v
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(bin)).find(|p| p.is_file())
}

pub fn engine(mode: Mode) -> Engine {
    Engine::new(Config { mode, ..Default::default() }).unwrap_or_else(|e| {
        panic!(
            "engine in {mode:?}: {e}\n(the runner is built by `cargo test --release --workspace`; \
             with `-p roma-byob-udf` alone build it first: `cargo build --release -p roma-byob`)"
        )
    })
}

pub fn load(engine: &Engine, binary: &str, options: LoadOptions) -> CodeToken {
    engine.load(binary, options).unwrap_or_else(|e| panic!("load {binary}: {e}"))
}

/// Options for a code token with the host API (and optionally shared memory).
pub fn host_api(workers: usize, shared_memory: Option<usize>) -> LoadOptions {
    LoadOptions { workers, host_api: true, shared_memory, ..Default::default() }
}

pub fn opts() -> ExecuteOptions {
    ExecuteOptions {
        worker_wait_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Both transports: the socket and a 1 MiB shared-memory region.
pub const TRANSPORTS: [Option<usize>; 2] = [None, Some(1 << 20)];
