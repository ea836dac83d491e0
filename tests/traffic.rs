//! `roma-byob traffic`: small open-loop runs (JSON report, SVG and PNG plots) and a short
//! `--find-max-qps` search, in minimal mode. No timing thresholds: only that the runs
//! complete, succeed and report sane values.

use std::path::PathBuf;
use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_roma-byob"))
}

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("traffic-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "roma-byob traffic failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_json(path: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

#[test]
fn traffic_plots_png() {
    let dir = temp_dir("png");
    let png = dir.join("latency.png");
    run(cli()
        .args(["traffic", "--mode", "minimal", "--workers", "2", "--qps", "200", "--num-queries", "40", "--no-progress"])
        .arg("--binary")
        .arg(roma_byob::samples::path("hello_nolibc"))
        .arg("--plot")
        .arg(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG file");
    // The IHDR chunk comes first: width and height, big-endian.
    assert_eq!(&bytes[12..16], b"IHDR");
    let (w, h) = (u32::from_be_bytes(bytes[16..20].try_into().unwrap()), u32::from_be_bytes(bytes[20..24].try_into().unwrap()));
    assert_eq!((w, h), (960, 540));
    // A blank 960x540 image compresses to a few hundred bytes; the curves,
    // grid and text make it tens of kilobytes.
    assert!(bytes.len() > 5_000, "{} bytes: nothing drawn?", bytes.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traffic_report_and_plot() {
    let dir = temp_dir("report");
    let json = dir.join("report.json");
    let svg = dir.join("latency.svg");
    let stdout = run(cli()
        .args(["traffic", "--mode", "minimal", "--workers", "4", "--qps", "200", "--num-queries", "200", "--no-progress"])
        .arg("--binary")
        .arg(roma_byob::samples::path("hello_world"))
        .arg("--zygote")
        .arg("--output")
        .arg(&json)
        .arg("--plot")
        .arg(&svg));
    assert!(stdout.contains("invocation") && stdout.contains("burst"), "{stdout}");

    let v = read_json(&json);
    for key in [
        "throughput_per_s",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "failures",
        "late_burst_pct",
        "mode",
        "target_qps",
        "workers",
        "burst_size",
        "executions",
        "min_us",
        "p95_us",
        "max_us",
        "burst_p50_us",
        "peak_queued",
    ] {
        assert!(v.get(key).is_some(), "key {key} missing from {v:#}");
    }
    assert_eq!(v["mode"], "minimal");
    assert_eq!(v["zygote"], true, "{v:#}");
    assert!(stdout.contains("zygote template"), "{stdout}");
    assert_eq!(v["failures"], 0, "{v:#}");
    assert_eq!(v["executions"], 200, "{v:#}");
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(v["p50_us"].as_u64().unwrap() > 0, "{v:#}");
    assert!(v["p50_us"].as_u64() <= v["p99_us"].as_u64(), "{v:#}");
    // CPU per execution: the engine threads' from schedstat (never zero: they read
    // every response here), the sandbox's from 10 ms ticks (may round to zero).
    assert!(v["engine_cpu_us"].as_f64().is_some_and(|us| us > 0.0), "{v:#}");
    assert!(v["engine_wakeups"].as_f64().is_some_and(|w| w > 0.0), "{v:#}");
    for key in ["runner_cpu_us", "workers_cpu_us"] {
        assert!(v[key].as_f64().is_some_and(|us| us >= 0.0), "{key}: {v:#}");
    }
    assert!(stdout.contains("CPU per execution: engine threads"), "{stdout}");

    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") || plot.starts_with("<?xml"), "{}", &plot[..plot.len().min(200)]);
    assert!(plot.contains("<polyline"), "the plot has no data series");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One worker and bursts of 10: most of each burst waits for a worker, and the
/// report says how many did at most.
#[test]
fn traffic_reports_the_backlog() {
    let dir = temp_dir("backlog");
    let json = dir.join("report.json");
    let stdout = run(cli()
        .args(["traffic", "--mode", "minimal", "--workers", "1", "--qps", "100", "--burst-size", "10", "--num-queries", "50", "--no-progress"])
        .arg("--binary")
        .arg(roma_byob::samples::path("hello_nolibc"))
        .arg("--output")
        .arg(&json));
    let v = read_json(&json);
    assert_eq!(v["failures"], 0, "{v:#}");
    let peak = v["peak_queued"].as_u64().unwrap_or_else(|| panic!("peak_queued missing: {v:#}"));
    // A burst of 10 with one worker: at most one runs, the rest wait (the count read
    // can trail the true backlog while the engine thread takes the burst in).
    assert!((2..=10).contains(&peak), "peak backlog {peak}: {v:#}");
    assert!(stdout.contains(&format!("backlog: at most {peak} executions waited")), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traffic_request_from_json_and_bursts() {
    // A request built from JSON through the .proto file, bursts of 5, a duration limit.
    let dir = temp_dir("json");
    let json = dir.join("report.json");
    run(cli()
        .args(["traffic", "--mode", "minimal", "--workers", "4", "--qps", "100", "--burst-size", "5"])
        .args(["--duration", "500ms", "--no-progress", "--binary"])
        .arg(roma_byob::samples::path("prime_sieve"))
        .args(["--proto", concat!(env!("CARGO_MANIFEST_DIR"), "/proto/sample.proto")])
        .args(["--request-type", "roma_byob.sample.SampleRequest", "--json", r#"{"primeBound": 1000}"#])
        .arg("--output")
        .arg(&json));
    let v = read_json(&json);
    assert_eq!(v["failures"], 0, "{v:#}");
    assert_eq!(v["burst_size"], 5, "{v:#}");
    assert_eq!(v["executions"], 50, "{v:#}");
    // 168 primes below 1000, packed: more than a handful of bytes per response.
    assert!(v["response_bytes"].as_u64().unwrap() > 50 * 100, "{v:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traffic_find_max_qps_terminates() {
    let dir = temp_dir("find-max");
    let json = dir.join("max.json");
    let stdout = run(cli()
        .args(["traffic", "--mode", "minimal", "--workers", "4", "--qps", "100", "--num-queries", "100"])
        .args(["--find-max-qps", "--max-steps", "4", "--no-progress"])
        // The search's termination and report are checked, not this machine's speed:
        // lenient pass criteria, so that a starved CI machine still passes a step.
        .args(["--late-threshold-pct", "100", "--min-throughput-pct", "10", "--output"])
        .arg(&json));
    assert!(stdout.contains("max sustainable rate"), "{stdout}");
    let v = read_json(&json);
    let max = v["max_qps"].as_f64().unwrap_or_else(|| panic!("no max_qps in {v:#}"));
    assert!(max > 0.0, "{v:#}");
    assert_eq!(v["target_qps"].as_f64(), Some(max), "{v:#}");
    assert!(v["search"]["other_steps"].is_array(), "{v:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traffic_rejects_bad_arguments() {
    let out = cli().args(["traffic", "--mode", "minimal", "--plot", "x.gif", "--num-queries", "1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg or .png"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli().args(["traffic", "--mode", "minimal", "--duration", "5 parsecs"]).output().unwrap();
    assert!(!out.status.success());
    // Each refused before any engine starts, with the flag named.
    for (flag, value, says) in [
        ("--qps", "0", "--qps must be a positive number"),
        ("--burst-size", "0", "--burst-size must be at least 1"),
        ("--late-threshold-pct", "150", "--late-threshold-pct must be above 0 and at most 100"),
        ("--late-threshold-pct", "0", "--late-threshold-pct must be above 0 and at most 100"),
        ("--min-throughput-pct", "101", "--min-throughput-pct must be from 0 to 100"),
        ("--max-steps", "0", "--max-steps must be at least 1"),
    ] {
        let out = cli().args(["traffic", "--mode", "minimal", "--find-max-qps", flag, value]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}
