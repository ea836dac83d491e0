//! The example UDFs in other languages (udfs/cpp, udfs/go, udfs/python, udfs/java):
//! each answers its greeting in every available mode. An example whose toolchain is
//! not installed was not built by build/samples.rs; its test says SKIP and passes.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, LoadOptions, Mode, SyscallFilter};

/// The compiled example, or `None` (after a SKIP line) when its toolchain was
/// missing at build time.
fn built(name: &str, language: &str, toolchain: &str) -> Option<PathBuf> {
    let path = roma_byob::samples::path(name);
    if path.is_file() {
        return Some(path);
    }
    // Straight to stderr, not eprintln!: the test harness would capture that and
    // only show it for failing tests.
    let _ = writeln!(std::io::stderr(), "SKIP {language}: {toolchain} not installed ({} was not built)", path.display());
    None
}

/// The library mounts the example needs besides the default ones: build/samples.rs
/// lists them in `<name>.mounts` (the interpreter, the class directory, ...).
fn extra_mounts(name: &str) -> Vec<PathBuf> {
    let path = roma_byob::samples::path(&format!("{name}.mounts"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn engine_for(mode: Mode, filter: SyscallFilter, extra: Vec<PathBuf>) -> Engine {
    let mut lib_mounts = Config::default().lib_mounts;
    lib_mounts.extend(extra);
    Engine::new(Config { mode, syscall_filter: filter, lib_mounts, ..Default::default() })
        .unwrap_or_else(|e| panic!("engine in {mode:?}: {e}"))
}

/// Interpreters and JVMs start slowly, in gVisor especially: generous limits.
fn slow_opts() -> ExecuteOptions {
    ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), timeout: Duration::from_secs(60), ..Default::default() }
}

fn greet(mode: Mode, e: &Engine, t: &CodeToken, prime_bound: i32, opts: ExecuteOptions) -> String {
    e.execute::<_, SampleResponse>(t, &SampleRequest { prime_bound }, opts)
        .and_then(|x| x.wait())
        .unwrap_or_else(|err| panic!("execute in {mode:?}: {err}"))
        .response
        .greeting
}

/// Loads `path` and checks its greeting over a few executions (each on a fresh worker).
fn check_greeting(mode: Mode, filter: SyscallFilter, path: PathBuf, extra: Vec<PathBuf>, want: &str, opts: ExecuteOptions) {
    let e = engine_for(mode, filter, extra);
    let t = e
        .load(&path, LoadOptions { workers: 1, ..Default::default() })
        .unwrap_or_else(|err| panic!("load {}: {err}", path.display()));
    for _ in 0..2 {
        assert_eq!(greet(mode, &e, &t, 0, opts.clone()), want, "{mode:?}");
    }
}

#[test]
fn cpp_greets_and_calls_the_host() {
    let Some(path) = built("hello_cpp", "C++", "a C++ compiler ($CXX, c++)") else { return };
    for mode in modes() {
        let e = engine(mode);
        e.register_host_function("test.Echo", |_ctx, req| Ok([b"pong:".as_slice(), req].concat())).unwrap();
        let t = e.load(&path, LoadOptions { workers: 2, host_api: true, ..Default::default() }).unwrap();
        assert_eq!(greet(mode, &e, &t, 0, opts()), "Hello from C++!", "{mode:?}");
        // prime_bound == 1: one host call "test.Echo"("cpp"), its reply is the greeting.
        assert_eq!(greet(mode, &e, &t, 1, opts()), "pong:cpp", "{mode:?}");
        // Without the opt-in the call gets an error reply, which the UDF reports.
        let plain = e.load(&path, LoadOptions { workers: 1, ..Default::default() }).unwrap();
        let refused = greet(mode, &e, &plain, 1, opts());
        assert!(refused.starts_with("error:the host API is not enabled"), "{mode:?}: {refused}");
        // The roma_udf session API also runs it on the shared-memory transport.
        let shm = e
            .load(&path, LoadOptions { workers: 1, host_api: true, shared_memory: Some(1 << 16), ..Default::default() })
            .unwrap();
        assert_eq!(greet(mode, &e, &shm, 0, opts()), "Hello from C++!", "{mode:?}");
        assert_eq!(greet(mode, &e, &shm, 1, opts()), "pong:cpp", "{mode:?}");
    }
}

#[test]
fn go_greets() {
    let Some(path) = built("hello_go", "Go", "go") else { return };
    for mode in modes() {
        check_greeting(mode, SyscallFilter::Untrusted, path.clone(), Vec::new(), "Hello from Go!", opts());
    }
}

#[test]
fn python_greets() {
    let Some(path) = built("python_hello", "Python", "python3") else { return };
    for mode in modes() {
        check_greeting(mode, SyscallFilter::Untrusted, path.clone(), extra_mounts("python_hello"), "Hello from Python!", slow_opts());
    }
}

/// The filter level the JVM runs under: the default `untrusted` in every mode.
/// (Inside gVisor HotSpot needs `getcpu`, which glibc's sched_getcpu() falls back to
/// there; the allowlist includes it.)
fn java_filter(_mode: Mode) -> SyscallFilter {
    // The default allowlist works in every mode (it allows getcpu, which the JVM
    // needs inside gVisor).
    SyscallFilter::Untrusted
}

#[test]
fn java_greets() {
    let Some(path) = built("java_hello", "Java", "javac") else { return };
    for mode in modes() {
        check_greeting(mode, java_filter(mode), path.clone(), extra_mounts("java_hello"), "Hello from Java!", slow_opts());
    }
}
