//! The `roma-byob` command line: exec (raw and JSON), errors, demo.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_roma-byob"))
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn exec_raw_protobuf() {
    for mode in modes() {
        let mut cmd = cli();
        cmd.args(["exec", "--mode", mode.as_str(), "--binary"]).arg(sample("hello_world"));
        let out = run_with_stdin(cmd, b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // SampleResponse{greeting: "Hello, world!"}: field 1, length 13.
        assert_eq!(out.stdout, b"\x0a\x0dHello, world!");
    }
}

#[test]
fn exec_json_and_logs() {
    for mode in modes() {
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/sample.proto");
        let mut cmd = cli();
        cmd.args(["exec", "--mode", mode.as_str(), "--log", "--binary"]).arg(sample("log_udf")).args([
            "--proto",
            proto,
            "--request-type",
            "roma_byob.sample.SampleRequest",
            "--response-type",
            "roma_byob.sample.SampleResponse",
            "--json",
            "{}",
        ]);
        let out = run_with_stdin(cmd, b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["greeting"], "Hello, world!");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("I am a stdout log.") && err.contains("I am a stderr log."), "{err}");

        let mut cmd = cli();
        cmd.args(["exec", "--mode", mode.as_str(), "--binary"]).arg(sample("prime_sieve")).args([
            "--proto",
            proto,
            "--request-type",
            "roma_byob.sample.SampleRequest",
            "--response-type",
            "roma_byob.sample.SampleResponse",
        ]);
        let out = run_with_stdin(cmd, br#"{"primeBound": 20}"#);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["primeNumber"], serde_json::json!([2, 3, 5, 7, 11, 13, 17, 19]));
    }
}

#[test]
fn exec_errors_go_to_stderr_with_a_failure_code() {
    let mut cmd = cli();
    cmd.args(["exec", "--binary", "/no/such/udf"]);
    let out = run_with_stdin(cmd, b"");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let mut cmd = cli();
    cmd.args(["exec", "--binary"]).arg(sample("exit_nonzero"));
    let out = run_with_stdin(cmd, b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with status 3"));

    let mut cmd = cli();
    cmd.args(["exec", "--binary"]).arg(sample("hello_world")).args([
        "--proto",
        concat!(env!("CARGO_MANIFEST_DIR"), "/proto/sample.proto"),
        "--request-type",
        "roma_byob.sample.SampleRequest",
        "--response-type",
        "roma_byob.sample.SampleResponse",
        "--json",
        "{\"noSuchField\": 1}",
    ]);
    let out = run_with_stdin(cmd, b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));
}

#[test]
fn demo_runs_real_executions_and_says_which_mode() {
    let out = cli()
        .args(["demo", "--workers", "4", "--sequential", "50", "--executions", "200"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    // The best mode available: gvisor when runsc is installed.
    let best = if modes().contains(&roma_byob::Mode::Gvisor) { "mode: gvisor" } else { "mode: minimal" };
    assert!(text.contains(best), "{text}");
    assert!(text.contains("executions/s (0 failed)"), "{text}");
    assert!(text.contains("\"Hello, world!\""), "{text}");
}

#[test]
fn a_sample_udf_can_be_named_instead_of_its_path() {
    // From a directory without such a file, a bare name is the sample of that name.
    let dir = std::env::temp_dir().join(format!("roma-cli-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = cli();
    cmd.current_dir(&dir).args(["exec", "--mode", "minimal", "--binary", "hello_world"]);
    let out = run_with_stdin(cmd, b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"\x0a\x0dHello, world!");

    let out = cli()
        .current_dir(&dir)
        .args(["demo", "--mode", "minimal", "--binary", "hello_nolibc", "--workers", "2"])
        .args(["--sequential", "10", "--executions", "20"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let resolved = sample("hello_nolibc");
    assert!(text.contains(&format!("binary: {}", resolved.display())), "{text}");

    // A name that is neither a file nor a sample is reported missing, as a path is.
    let mut cmd = cli();
    cmd.current_dir(&dir).args(["exec", "--mode", "minimal", "--binary", "no_such_sample"]);
    let out = run_with_stdin(cmd, b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_sample does not exist"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
