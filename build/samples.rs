//! Compiles the sample UDFs under `udfs/` (see udfs/README.md) into
//! `$OUT_DIR/udfs/<name>` and exports that directory to the crate as the
//! compile-time env var `ROMA_BYOB_SAMPLE_UDFS`.
//!
//! - every `udfs/c/*.c` with `$CC` (default `cc`), `-O2 -Wall -Wextra -Werror`,
//!   dynamically linked against the system libc, plus `hello_world_static`
//!   (hello_world.c with `-static`);
//! - `udfs/nolibc/hello_nolibc.c` with `-static -nostdlib` (no C library: the
//!   spawn-floor UDF);
//! - every `udfs/rust/*.rs` with `$RUSTC` (default `rustc`), `--edition 2021
//!   -C opt-level=3 -C panic=abort`, plus `hello_world_rs_static`
//!   (hello_world_rs.rs with `-C target-feature=+crt-static`).
//!
//! - the examples in other languages, each only when its toolchain is installed
//!   (otherwise a `cargo:warning` says it was skipped):
//!   - every `udfs/cpp/*.cc` with `$CXX` (default `c++`), `-std=c++17 -O2 -Wall
//!     -Wextra -Werror -I udfs/c`, dynamically linked (glibc, libstdc++);
//!   - `udfs/go/` with `go build` (`CGO_ENABLED=0`: static) into `hello_go`, when
//!     `go` is on `PATH`; offline, with its caches under `$OUT_DIR/go`;
//!   - `python_hello`: `udfs/python/python_launcher.c` with `udfs/python/hello.py`
//!     embedded (generated header), exec'ing `/usr/bin/python3` (its real path);
//!   - `java_hello`: `udfs/java/Hello.java` compiled by `javac` into
//!     `$OUT_DIR/udfs/java_hello.classes/`, and `udfs/java/java_launcher.c`
//!     exec'ing the JVM next to `javac` (its real path).
//!
//!   The interpreted ones write `<name>.mounts` next to the binary: the host paths
//!   (one a line) to add to `Config::lib_mounts` for the UDF to run.
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
    /// Extra environment variables (`None`: removed from the environment).
    env: Vec<(&'static str, Option<OsString>)>,
    /// Working directory (`None`: the build script's).
    cwd: Option<PathBuf>,
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
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        let output = command.output();
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
    c_job_with(cc, &[], src, &[include], out, static_link)
}

/// A C (or, with `lang_args` such as `-std=c++17`, C++) compilation.
fn c_job_with(
    cc: &(OsString, Vec<OsString>),
    lang_args: &[&str],
    src: &Path,
    includes: &[&Path],
    out: &Path,
    static_link: bool,
) -> Job {
    let mut args = cc.1.clone();
    args.extend(lang_args.iter().map(OsString::from));
    args.extend(["-O2", "-Wall", "-Wextra", "-Werror"].map(OsString::from));
    if static_link {
        args.push("-static".into());
    }
    for include in includes {
        args.push(OsString::from("-I"));
        args.push(include.into());
    }
    args.push("-o".into());
    args.push(out.into());
    args.push(src.into());
    Job {
        source: src.to_owned(),
        program: cc.0.clone(),
        args,
        hint: if static_link { C_STATIC_HINT } else { C_HINT },
        env: Vec::new(),
        cwd: None,
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
        env: Vec::new(),
        cwd: None,
    }
}

// ---------------------------------------------------------------------------------
// Examples in other languages (udfs/cpp, udfs/go, udfs/python, udfs/java): each is
// built only when its toolchain is installed, otherwise a `cargo:warning` says so.
// ---------------------------------------------------------------------------------

const CXX_HINT: &str = "the C++ example UDF needs a C++ compiler: on Debian/Ubuntu \
     `apt-get install g++` (or set CXX to another compiler)";
const GO_HINT: &str = "the Go example UDF is built with the `go` on PATH (standard library only, \
     offline); on Debian/Ubuntu `apt-get install golang-go`";
const JAVA_HINT: &str = "the Java example UDF is compiled with the `javac` on PATH; on \
     Debian/Ubuntu `apt-get install default-jdk-headless`";
const LAUNCHER_HINT: &str = "the Python and Java example UDFs have a C launcher: on Debian/Ubuntu \
     `apt-get install gcc libc6-dev` (or set CC to another compiler)";

/// Host directories every engine mounts by default (`Config::lib_mounts`).
const DEFAULT_MOUNTS: [&str; 3] = ["/lib", "/lib64", "/usr/lib"];

/// Where the examples in other languages put what they generate.
struct Dirs<'a> {
    udfs: &'a Path,
    /// `$OUT_DIR/udfs`: the binaries.
    out: &'a Path,
    /// `$OUT_DIR/udfs-gen`: generated headers, Go caches.
    gen: &'a Path,
}

/// Announces that an example was not built and removes what an earlier build left.
fn skip(dirs: &Dirs, outputs: &[&str], message: &str) {
    println!("cargo:warning={message}");
    for name in outputs {
        let path = dirs.out.join(name);
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove stale {}: {e}", path.display()),
        }
    }
}

/// `bin` in a directory of `PATH`.
fn which(bin: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// Whether `path` starts with the ELF magic (a binary the sandbox can exec).
fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn under_default_mounts(path: &Path) -> bool {
    DEFAULT_MOUNTS.iter().any(|m| path.starts_with(m))
}

fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// `<name>.mounts`: the extra `Config::lib_mounts` the example needs, one a line.
fn write_mounts(dirs: &Dirs, name: &str, mounts: &[PathBuf]) {
    let mut text = String::new();
    for m in mounts {
        text.push_str(
            m.to_str()
                .unwrap_or_else(|| panic!("non-UTF-8 mount path {}", m.display())),
        );
        text.push('\n');
    }
    write_file(&dirs.out.join(format!("{name}.mounts")), &text);
}

/// `bytes` as a C string literal, one source line per line of text.
fn c_string_literal(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        match b {
            b'\n' => out.push_str("\\n\"\n    \""),
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            // `?` too: no trigraphs.
            b'?' => out.push_str("\\?"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out.push('"');
    out
}

fn path_literal(path: &Path) -> String {
    let s = path
        .to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", path.display()));
    c_string_literal(s.as_bytes())
}

/// C++: every `udfs/cpp/*.cc`, with `$CXX` (default `c++`).
fn cpp_jobs(dirs: &Dirs, jobs: &mut Vec<Job>) {
    let sources = sources(&dirs.udfs.join("cpp"), "cc");
    let names: Vec<String> = sources.iter().map(|s| stem(s)).collect();
    let cxx = tool_from_env("CXX", "c++");
    let works = Command::new(&cxx.0)
        .args(&cxx.1)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        let outputs: Vec<&str> = names.iter().map(String::as_str).collect();
        skip(
            dirs,
            &outputs,
            &format!(
                "{} not installed: C++ example UDF not built (apt-get install g++, or set CXX)",
                cxx.0.to_string_lossy()
            ),
        );
        return;
    }
    let include = dirs.udfs.join("c");
    for (src, name) in sources.iter().zip(&names) {
        let mut job = c_job_with(&cxx, &["-std=c++17"], src, &[&include], &dirs.out.join(name), false);
        job.hint = CXX_HINT;
        jobs.push(job);
    }
}

/// Go: `udfs/go/` (a module without dependencies) into `hello_go`, static, offline.
fn go_job(dirs: &Dirs, jobs: &mut Vec<Job>) {
    let src = dirs.udfs.join("go");
    if !src.join("go.mod").is_file() {
        return;
    }
    let Some(go) = which("go") else {
        skip(dirs, &["hello_go"], "go not installed: Go example UDF not built");
        return;
    };
    let cache = dirs.gen.join("go");
    let var = |p: PathBuf| Some(p.into_os_string());
    let set = |v: &str| Some(OsString::from(v));
    jobs.push(Job {
        source: src.clone(),
        program: go.into_os_string(),
        args: [
            "build",
            "-trimpath",
            // No VCS stamping: it would run git on the repository.
            "-buildvcs=false",
            "-ldflags=-s -w",
            "-o",
        ]
        .map(OsString::from)
        .into_iter()
        .chain([dirs.out.join("hello_go").into_os_string(), ".".into()])
        .collect(),
        hint: GO_HINT,
        // Everything the go command would otherwise take from $HOME or the network.
        env: vec![
            ("CGO_ENABLED", set("0")),
            ("GOCACHE", var(cache.join("cache"))),
            ("GOPATH", var(cache.join("path"))),
            ("GOMODCACHE", var(cache.join("path/pkg/mod"))),
            ("GOENV", set("off")),
            ("GOFLAGS", set("-mod=readonly")),
            ("GOPROXY", set("off")),
            ("GOSUMDB", set("off")),
            ("GOTOOLCHAIN", set("local")),
            ("GOTELEMETRY", set("off")),
            ("GOWORK", set("off")),
            ("GO111MODULE", set("on")),
            ("GOOS", None),
            ("GOARCH", None),
        ],
        cwd: Some(src),
    });
}

/// Python: `python_hello`, a C launcher embedding `udfs/python/hello.py` that execs
/// the real path of `/usr/bin/python3`.
fn python_jobs(dirs: &Dirs, cc: &(OsString, Vec<OsString>), jobs: &mut Vec<Job>) {
    let script_path = dirs.udfs.join("python/hello.py");
    let launcher = dirs.udfs.join("python/python_launcher.c");
    if !script_path.is_file() {
        return;
    }
    let outputs = ["python_hello", "python_hello.mounts"];
    let python = Path::new("/usr/bin/python3");
    let interpreter = match fs::canonicalize(python) {
        Ok(p) if is_elf(&p) => p,
        _ => {
            skip(dirs, &outputs, "python3 not installed: Python example UDF not built");
            return;
        }
    };
    println!("cargo:rerun-if-changed={}", python.display());
    let script = fs::read(&script_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", script_path.display()));
    let include = dirs.gen.join("python");
    write_file(
        &include.join("python_hello_script.h"),
        &format!(
            "/* Generated by build/samples.rs from udfs/python/hello.py. */\n\
             #define ROMA_PYTHON3_PATH {}\n\
             static const char ROMA_PYTHON_SCRIPT[] =\n    {};\n",
            path_literal(&interpreter),
            c_string_literal(&script),
        ),
    );
    let mut mounts = Vec::new();
    if !under_default_mounts(&interpreter) {
        mounts.push(interpreter);
    }
    write_mounts(dirs, "python_hello", &mounts);
    let mut job = c_job_with(cc, &[], &launcher, &[&include], &dirs.out.join("python_hello"), false);
    job.hint = LAUNCHER_HINT;
    jobs.push(job);
}

/// Java: `udfs/java/Hello.java` compiled by `javac` into `java_hello.classes/`, and
/// `java_hello`, a C launcher that execs the JVM next to `javac`.
fn java_jobs(dirs: &Dirs, cc: &(OsString, Vec<OsString>), jobs: &mut Vec<Job>) {
    let class_src = dirs.udfs.join("java/Hello.java");
    let launcher = dirs.udfs.join("java/java_launcher.c");
    if !class_src.is_file() {
        return;
    }
    let outputs = ["java_hello", "java_hello.mounts", "java_hello.classes"];
    let Some(javac) = which("javac").and_then(|j| fs::canonicalize(j).ok()) else {
        skip(dirs, &outputs, "javac not installed: Java example UDF not built");
        return;
    };
    // The JVM of the same JDK, else the `java` on PATH.
    let java = javac
        .parent()
        .map(|bin| bin.join("java"))
        .filter(|j| is_elf(j))
        .or_else(|| which("java").and_then(|j| fs::canonicalize(j).ok()).filter(|j| is_elf(j)));
    let Some(java) = java else {
        skip(dirs, &outputs, "java not installed: Java example UDF not built");
        return;
    };
    let java_home = java
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} has no Java home", java.display()))
        .to_owned();
    let classes = dirs.out.join("java_hello.classes");
    match fs::remove_dir_all(&classes) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", classes.display()),
    }
    fs::create_dir_all(&classes)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", classes.display()));
    jobs.push(Job {
        source: class_src.clone(),
        program: javac.into_os_string(),
        // -J-XX:-UsePerfData: javac's own JVM leaves no /tmp/hsperfdata_<user>.
        args: ["-J-XX:-UsePerfData", "-encoding", "UTF-8", "-Xlint:all", "-Werror", "-d"]
            .map(OsString::from)
            .into_iter()
            .chain([classes.clone().into_os_string(), class_src.into_os_string()])
            .collect(),
        hint: JAVA_HINT,
        env: Vec::new(),
        cwd: None,
    });

    let include = dirs.gen.join("java");
    write_file(
        &include.join("java_hello_config.h"),
        &format!(
            "/* Generated by build/samples.rs. */\n\
             #define ROMA_JAVA_PATH {}\n\
             #define ROMA_JAVA_LIB_DIR {}\n\
             #define ROMA_JAVA_CLASSES {}\n",
            path_literal(&java),
            path_literal(&java_home.join("lib")),
            path_literal(&classes),
        ),
    );
    // What the sandbox must show besides the default mounts: the class directory,
    // the JDK when it lives elsewhere, and the launcher's jvm.cfg, which Debian links
    // to /etc (the java launcher refuses to start without it).
    let mut mounts = vec![classes];
    if !under_default_mounts(&java_home) {
        mounts.push(java_home.clone());
    }
    if let Ok(cfg) = fs::canonicalize(java_home.join("lib/jvm.cfg")) {
        if !under_default_mounts(&cfg) && !cfg.starts_with(&java_home) {
            mounts.push(cfg);
        }
    }
    write_mounts(dirs, "java_hello", &mounts);
    let mut job = c_job_with(cc, &[], &launcher, &[&include], &dirs.out.join("java_hello"), false);
    job.hint = LAUNCHER_HINT;
    jobs.push(job);
}

pub fn build() {
    println!("cargo:rerun-if-changed=udfs");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=RUSTC");
    println!("cargo:rerun-if-env-changed=CXX");

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

    let gen_dir = out_dir.with_file_name("udfs-gen");
    let dirs = Dirs { udfs: &udfs, out: &out_dir, gen: &gen_dir };

    // The slow jobs (go, javac, rustc) go first so that they overlap with the many
    // quick C compilations.
    let mut jobs = Vec::new();
    go_job(&dirs, &mut jobs);
    java_jobs(&dirs, &cc, &mut jobs);
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

    // The spawn-floor UDF: no C library at all (x86_64 only).
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        let src = dirs.udfs.join("nolibc/hello_nolibc.c");
        let mut job = c_job_with(&cc, &[], &src, &[], &out_dir.join("hello_nolibc"), true);
        let at = job.args.len() - 4;
        for flag in ["-nostdlib", "-fno-stack-protector", "-fno-builtin"] {
            job.args.insert(at, flag.into());
        }
        jobs.push(job);
    }

    python_jobs(&dirs, &cc, &mut jobs);
    cpp_jobs(&dirs, &mut jobs);

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
