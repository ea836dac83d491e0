//! roma-byob: run untrusted, pre-compiled binaries ("UDFs", any language) for short
//! request/response executions, each request on a fresh process, inside a sandbox,
//! driven by a thread-per-core io_uring engine. Speaks the Roma BYOB UDF wire
//! protocol, so binaries written for Roma run unchanged.
//!
//! ```no_run
//! use roma_byob::{Config, Engine, ExecuteOptions, LoadOptions};
//! use roma_byob::proto::sample::{SampleRequest, SampleResponse};
//!
//! let engine = Engine::new(Config::default())?;
//! let token = engine.load(roma_byob::samples::path("hello_world"), LoadOptions { workers: 4, ..Default::default() })?;
//! let done = engine.execute::<_, SampleResponse>(&token, &SampleRequest::default(), ExecuteOptions::default())?.wait()?;
//! assert_eq!(done.response.greeting, "Hello, world!");
//! # Ok::<(), roma_byob::Error>(())
//! ```

mod completion;
mod config;
mod engine;
mod error;
pub mod host_api;
pub mod ipc;
pub mod ring;
pub mod sandbox;
mod supervisor;
mod token;
pub mod udf_runner;

pub use completion::{Execution, Logs, Metrics, Response};
pub use config::{Config, ExecuteOptions, LoadOptions, MemoryLimit, Mode, SyscallFilter};
pub use engine::Engine;
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub use engine::FAULT_KEY;
pub use error::{Code, Error, Result};
pub use host_api::{HostCallContext, HostFuture, HostResult};
pub use token::{CodeToken, ExecutionToken};

/// Generated types of the sample UDFs' API (proto/sample.proto).
pub mod proto {
    /// `roma_byob.sample`: requests and responses of the sample UDFs.
    pub mod sample {
        include!(concat!(env!("OUT_DIR"), "/roma_byob.sample.rs"));
    }
}

/// The sample UDFs built with the crate (udfs/): hello world, prime sieve, logging,
/// payloads, failure cases and sandbox probes.
pub mod samples {
    use std::path::PathBuf;

    /// Directory holding the compiled sample UDFs.
    pub fn dir() -> PathBuf {
        PathBuf::from(option_env!("ROMA_BYOB_SAMPLE_UDFS").unwrap_or("udfs-not-built"))
    }

    /// Path of one compiled sample UDF, e.g. `path("hello_world")`.
    pub fn path(name: &str) -> PathBuf {
        dir().join(name)
    }

    /// A binary named on a command line: `arg` itself if it exists or has a
    /// directory part, else the sample UDF of that name if there is one (so
    /// `--binary hello_nolibc` works from anywhere), else `arg` (whose load then
    /// reports it missing).
    pub fn resolve(arg: &std::path::Path) -> PathBuf {
        if !arg.exists() && arg.components().count() == 1 {
            let sample = path(&arg.to_string_lossy());
            if sample.is_file() {
                return sample;
            }
        }
        arg.to_path_buf()
    }

    /// The answer `sort_list` must give (its reference implementation, for tests
    /// and benchmarks that check it).
    pub fn sort_list_reference(req: &crate::proto::sample::SortListRequest) -> crate::proto::sample::SortListResponse {
        let mut x = if req.seed == 0 { 2_463_534_242u32 } else { req.seed };
        let mut items: Vec<i32> = (0..req.count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as i32
            })
            .collect();
        items.sort_unstable();
        let checksum = items
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &v)| acc.wrapping_add((i as u64 + 1).wrapping_mul(u64::from(v as u32))));
        crate::proto::sample::SortListResponse {
            count: req.count,
            min: items.first().copied().unwrap_or(0),
            max: items.last().copied().unwrap_or(0),
            checksum,
        }
    }
}
