//! Compiles the sample UDFs under `udfs/` (see udfs/README.md) into
//! `$OUT_DIR/udfs/<name>` and exports that directory to the crate as the
//! compile-time env var `ROMA_BYOB_SAMPLE_UDFS`.
//!
//! - every `udfs/c/*.c` with `$CC` (default `cc`), `-O2 -Wall -Wextra -Werror`,
//!   dynamically linked against the system libc, plus `hello_world_static`
//!   (hello_world.c with `-static`);
//! - every `udfs/rust/*.rs` with `$RUSTC` (default `rustc`), `--edition 2021
//!   -C opt-level=3 -C panic=abort`, plus `hello_world_rs_static`
//!   (hello_world_rs.rs with `-C target-feature=+crt-static`).
//!
//! Uses only std; the compilations run in parallel on scoped threads.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

/// One compiler invocation.
struct Job {
    /// Source file, for messages.
    source: PathBuf,
    program: OsString,
    args: Vec<OsString>,
    /// What to tell the user to install when this fails.
    hint: &'static str,
}

impl Job {
    fn command_line(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Runs the compiler; on failure returns a message naming the file, the command
    /// and the compiler's output, and whether the compiler could not be started at all.
    fn run(&self) -> Result<(), (bool, String)> {
        let output = Command::new(&self.program).args(&self.args).output();
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                let message = format!(
                    "cannot compile sample UDF {}: cannot run `{}`: {e}\n  command: {}\n  hint: {}",
                    self.source.display(),
                    self.program.to_string_lossy(),
                    self.command_line(),
                    self.hint,
                );
                return Err((true, message));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let message = format!(
            "cannot compile sample UDF {}: compiler {}\n  command: {}\n  stderr:\n{}{}\n  hint: {}",
            self.source.display(),
            output.status,
            self.command_line(),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
            self.hint,
        );
        Err((false, message))
    }
}

const C_HINT: &str =
    "the sample UDFs need a C compiler and the C library headers: on Debian/Ubuntu \
     `apt-get install gcc libc6-dev` (or set CC to another compiler)";
const C_STATIC_HINT: &str = "the static sample UDF needs the static C library (libc.a): on \
     Debian/Ubuntu `apt-get install gcc libc6-dev`";
const RUST_HINT: &str =
    "the Rust sample UDFs are built with the rustc running this build (env RUSTC)";
const RUST_STATIC_HINT: &str = "hello_world_rs_static is linked with +crt-static, which needs the \
     static C library (libc.a): on Debian/Ubuntu `apt-get install libc6-dev`";

/// Splits a `CC`-style variable into program and leading arguments ("ccache gcc").
fn tool_from_env(var: &str, default: &str) -> (OsString, Vec<OsString>) {
    let value = env::var_os(var).filter(|v| !v.is_empty());
    let Some(value) = value else {
        return (default.into(), Vec::new());
    };
    match value.to_str() {
        Some(s) if s.split_whitespace().count() > 1 => {
            let mut parts = s.split_whitespace().map(OsString::from);
            let program = parts.next().expect("non-empty");
            (program, parts.collect())
        }
        _ => (value, Vec::new()),
    }
}

/// Files in `dir` whose extension is `ext`, sorted (absent directory: none).
fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|x| x == ext) && p.is_file())
        .collect();
    files.sort();
    files
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_else(|| panic!("sample UDF {} has a non-UTF-8 name", path.display()))
        .to_owned()
}

fn c_job(
    cc: &(OsString, Vec<OsString>),
    src: &Path,
    include: &Path,
    out: &Path,
    static_link: bool,
) -> Job {
    let mut args = cc.1.clone();
    args.extend(["-O2", "-Wall", "-Wextra", "-Werror"].map(OsString::from));
    if static_link {
        args.push("-static".into());
    }
    args.push(OsString::from("-I"));
    args.push(include.into());
    args.push("-o".into());
    args.push(out.into());
    args.push(src.into());
    Job {
        source: src.to_owned(),
        program: cc.0.clone(),
        args,
        hint: if static_link { C_STATIC_HINT } else { C_HINT },
    }
}

fn rust_job(
    rustc: &(OsString, Vec<OsString>),
    src: &Path,
    name: &str,
    out: &Path,
    static_link: bool,
) -> Job {
    let mut args = rustc.1.clone();
    args.extend(
        [
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "-C",
            "opt-level=3",
            "-C",
            "panic=abort",
        ]
        .map(OsString::from),
    );
    if static_link {
        args.extend(["-C", "target-feature=+crt-static"].map(OsString::from));
    }
    args.push("--crate-name".into());
    args.push(name.into());
    args.push("-o".into());
    args.push(out.into());
    args.push(src.into());
    Job {
        source: src.to_owned(),
        program: rustc.0.clone(),
        args,
        hint: if static_link {
            RUST_STATIC_HINT
        } else {
            RUST_HINT
        },
    }
}

pub fn build() {
    println!("cargo:rerun-if-changed=udfs");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=RUSTC");

    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo"),
    );
    let udfs = manifest_dir.join("udfs");
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo")).join("udfs");
    let out_dir = if out_dir.is_absolute() {
        out_dir
    } else {
        env::current_dir().expect("current directory").join(out_dir)
    };
    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));

    let cc = tool_from_env("CC", "cc");
    let rustc = tool_from_env("RUSTC", "rustc");
    let c_dir = udfs.join("c");
    let rust_dir = udfs.join("rust");

    // The slow jobs (rustc) go first so that they overlap with the many quick C
    // compilations.
    let mut jobs = Vec::new();
    for src in sources(&rust_dir, "rs") {
        let name = stem(&src);
        jobs.push(rust_job(&rustc, &src, &name, &out_dir.join(&name), false));
        if name == "hello_world_rs" {
            let static_name = "hello_world_rs_static";
            jobs.push(rust_job(
                &rustc,
                &src,
                static_name,
                &out_dir.join(static_name),
                true,
            ));
        }
    }
    for src in sources(&c_dir, "c") {
        let name = stem(&src);
        jobs.push(c_job(&cc, &src, &c_dir, &out_dir.join(&name), false));
        if name == "hello_world" {
            jobs.push(c_job(
                &cc,
                &src,
                &c_dir,
                &out_dir.join("hello_world_static"),
                true,
            ));
        }
    }

    let workers = thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                if let Err((cannot_spawn, message)) = job.run() {
                    let key = cannot_spawn.then(|| job.program.clone());
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, key, message));
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failures.is_empty() {
        // In job order; a compiler that cannot be started is reported once, not once
        // per source file.
        failures.sort_by_key(|f| f.0);
        let mut missing_programs = Vec::new();
        let mut messages = Vec::new();
        for (_, key, message) in failures {
            if let Some(program) = key {
                if missing_programs.contains(&program) {
                    continue;
                }
                missing_programs.push(program);
            }
            messages.push(message);
        }
        panic!("{}", messages.join("\n\n"));
    }

    println!(
        "cargo:rustc-env=ROMA_BYOB_SAMPLE_UDFS={}",
        out_dir.display()
    );
}
