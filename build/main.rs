//! Build script: compiles the .proto files (pure Rust: protox, no system protoc) and
//! the sample UDFs under `udfs/` (C with the system C compiler, Rust with rustc).

#[path = "samples.rs"]
mod samples;
#[path = "zygote_shim.rs"]
mod zygote_shim;

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let files = ["proto/control.proto", "proto/sample.proto", "proto/host_api.proto"];
    let fds = protox::compile(files, ["proto"]).expect("compile proto/*.proto with protox");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("generate Rust code for proto/*.proto");

    zygote_shim::build();
    samples::build();
}
