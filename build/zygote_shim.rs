//! The zygote shim (`src/udf_runner/zygote_shim.c`): a freestanding shared object
//! built with the system C compiler (the one that links this crate). It must
//! import nothing (no libc symbol, no stack protector): `-nostdlib` links no
//! library, and `--no-undefined` makes any symbol it would import a link error.

use std::env;
use std::path::PathBuf;
use std::process::Command;

pub fn build() {
    let src = "src/udf_runner/zygote_shim.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo")).join("zygote_shim.so");
    let cc = env::var("CC").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "cc".into());
    let mut parts = cc.split_whitespace();
    let program = parts.next().unwrap_or("cc");
    let output = Command::new(program)
        .args(parts)
        .args([
            "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-nostdlib", "-ffreestanding",
            "-fno-stack-protector", "-fno-builtin", "-fvisibility=hidden", "-Wl,-z,now", "-Wl,-z,noexecstack",
            "-Wl,--no-undefined", "-s", "-o",
        ])
        .arg(&out)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {program:?} for {src}: {e} (set CC, or `apt-get install gcc`)"));
    if !output.status.success() {
        panic!("building {src} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}
