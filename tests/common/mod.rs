//! Shared helpers for the integration tests: every test runs in each sandbox mode
//! available on this machine.
#![allow(dead_code)]

pub mod host_functions;

use std::path::PathBuf;
use std::time::Duration;

use roma_byob::proto::sample::{ProbeRequest, ProbeResponse, SampleRequest, SampleResponse};
use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, ExecutionToken, LoadOptions, Mode, SyscallFilter};

/// The modes these tests run in: `minimal` always, `gvisor` when runsc is installed
/// (a visible skip line otherwise).
pub fn modes() -> Vec<Mode> {
    let mut v = vec![Mode::Minimal];
    if which("runsc").is_some() || std::path::Path::new("/usr/bin/runsc").is_file() {
        v.push(Mode::Gvisor);
    } else {
        eprintln!("SKIP gvisor mode: runsc is not installed (apt-get install -y runsc)");
    }
    v
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(bin))
        .find(|p| p.is_file())
}

pub fn engine(mode: Mode) -> Engine {
    engine_with(mode, SyscallFilter::Untrusted)
}

pub fn engine_with(mode: Mode, filter: SyscallFilter) -> Engine {
    Engine::new(Config { mode, syscall_filter: filter, ..Default::default() })
        .unwrap_or_else(|e| panic!("engine in {mode:?}: {e}"))
}

/// Polls `Engine::live_workers` until it is `want` (at most 60 s); returns the last count.
pub fn wait_live(e: &Engine, want: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut live = e.live_workers();
    while live != want && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        live = e.live_workers();
    }
    live
}

/// Polls `Engine::idle_workers` until `token` has at least `want` ready workers (at
/// most 30 s): for tests that need a request to find a ready worker (in gVisor a
/// worker takes tens of ms to start, more on a loaded machine).
pub fn wait_idle(e: &Engine, token: &CodeToken, want: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while e.idle_workers(token).unwrap() < want && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The shard (index into `Config::cores`) an execution runs on, read from its
/// token's text form `exec-SHARD-ID`.
pub fn shard_of(token: &ExecutionToken) -> usize {
    let text = token.to_string();
    text.split('-').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("unexpected execution token {text}"))
}

pub fn sample(name: &str) -> PathBuf {
    let p = roma_byob::samples::path(name);
    assert!(p.is_file(), "sample UDF {} was not built", p.display());
    p
}

pub fn load(engine: &Engine, name: &str, workers: usize) -> CodeToken {
    engine
        .load(sample(name), LoadOptions { workers, ..Default::default() })
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
}

pub fn opts() -> ExecuteOptions {
    ExecuteOptions { worker_wait_timeout: Duration::from_secs(10), timeout: Duration::from_secs(20), ..Default::default() }
}

pub fn hello(engine: &Engine, token: &CodeToken) -> roma_byob::Result<String> {
    engine
        .execute::<_, SampleResponse>(token, &SampleRequest::default(), opts())?
        .wait()
        .map(|r| r.response.greeting)
}

/// Sample UDFs that fail their execution, each with a phrase its error must hold.
/// The worker is PID 1 of its namespace, so abort()'s SIGABRT is ignored and glibc
/// ends it with a fault instead: any "killed by signal" is right.
pub const FAILING_UDFS: [(&str, &str); 4] = [
    ("abort_after_ready", "killed by signal"),
    ("exit_nonzero", "status 3"),
    ("garbage_frame", "malformed response frame"),
    ("abort_before_ready", "before signalling readiness"),
];

/// Each of [`FAILING_UDFS`], loaded by `load_one`, fails two executions with
/// `Unavailable` and its phrase, and `good` still answers after each (the token is
/// deleted after its turn).
pub fn check_failing_udfs(e: &Engine, good: &CodeToken, load_one: impl Fn(&str) -> CodeToken) {
    for (name, needle) in FAILING_UDFS {
        let t = load_one(name);
        for _ in 0..2 {
            let err = e
                .execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts())
                .unwrap()
                .wait()
                .unwrap_err();
            assert_eq!(err.code(), roma_byob::Code::Unavailable, "{name}: {err}");
            assert!(err.message().contains(needle), "{name}: {err}");
        }
        assert_eq!(hello(e, good).unwrap(), "Hello, world!", "engine still serves after {name}");
        e.delete(&t).unwrap();
    }
}

pub fn probe(engine: &Engine, token: &CodeToken, what: &str, arg: &str) -> String {
    let req = ProbeRequest { probe: what.into(), arg: arg.into() };
    engine
        .execute::<_, ProbeResponse>(token, &req, opts())
        .and_then(|e| e.wait())
        .unwrap_or_else(|e| panic!("probe {what} {arg}: {e}"))
        .response
        .result
}

/// The `Cpus_allowed_list` of a /proc status file (a process or a thread).
pub fn cpus_allowed(status_path: &str) -> String {
    try_cpus_allowed(status_path).unwrap_or_else(|| panic!("cannot read {status_path}"))
}

/// The first core this process may run on: where a one-engine-thread test puts
/// its engine thread.
pub fn first_allowed_core() -> usize {
    cpus_allowed("/proc/self/status")
        .split(['-', ','])
        .next()
        .and_then(|c| c.parse::<usize>().ok())
        .expect("an allowed core")
}

/// As [`cpus_allowed`], or `None` when the file is gone (a process reaped meanwhile).
pub fn try_cpus_allowed(status_path: &str) -> Option<String> {
    let status = std::fs::read_to_string(status_path).ok()?;
    Some(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default(),
    )
}

/// The runner's threads as read from /proc: name, `read(status path)` of the thread,
/// and of each of its live children (a child reaped meanwhile is skipped). Polls
/// until the threads list at least `workers` children (at most 10 s).
pub fn runner_threads<T: Ord>(pid: u32, workers: usize, read: impl Fn(&str) -> Option<T>) -> Vec<(String, Option<T>, Vec<T>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut out: Vec<(String, Option<T>, Vec<T>)> = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            let listed: Vec<T> = children.split_whitespace().filter_map(|c| read(&format!("/proc/{c}/status"))).collect();
            out.push((comm, read(&format!("{}/status", task.path().display())), listed));
        }
        out.sort();
        let found: usize = out.iter().map(|(_, _, w)| w.len()).sum();
        if found >= workers || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
