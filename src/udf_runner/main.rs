//! `roma-byob-runner`: the trusted supervisor that lives inside the sandbox and keeps
//! the engine's worker slots filled. Started by the engine, never by hand.

fn main() {
    std::process::exit(roma_byob::udf_runner::run(std::env::args().skip(1).collect()));
}
