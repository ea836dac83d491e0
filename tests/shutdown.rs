//! Shutdown leaves nothing behind: no process, no fd, no mount, no temp dir.
//! Alone in its own test binary so fd counts are not disturbed by other tests.

mod common;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::Code;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn children_of_self() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) {
            // Field 4 (after the parenthesised command) is the parent pid.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_string()) {
                let ppid = rest.split_whitespace().nth(1).unwrap_or("");
                if ppid == me {
                    kids.push(name);
                }
            }
        }
    }
    kids
}

/// Processes anywhere on the host whose command line names one of our gVisor
/// containers (runsc run, runsc-sandbox, runsc-gofer).
fn our_runsc_processes() -> Vec<String> {
    let needle = format!("roma-byob-{}-", std::process::id());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("runsc") && cmd.contains(&needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn shutdown_completes_pending_executions_and_leaves_nothing_behind() {
    for mode in modes() {
        let fds_before = fd_count();
        let tmp_before: Vec<_> = std::fs::read_dir("/tmp").unwrap().flatten().map(|e| e.file_name()).collect();
        let e = engine(mode);
        let hang = load(&e, "never_answer", 2);
        let logs = e.load_for_logging(&load(&e, "log_udf", 1), 2).unwrap();
        let ok = load(&e, "hello_world", 3);
        assert_eq!(hello(&e, &ok).unwrap(), "Hello, world!");
        let r = e.execute::<_, SampleResponse>(&logs, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
        assert!(r.logs.is_ok());
        let pending: Vec<_> = (0..4)
            .map(|_| e.execute::<_, SampleResponse>(&hang, &SampleRequest::default(), opts()).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!children_of_self().is_empty(), "the sandbox runs as our child");
        if mode != roma_byob::Mode::Minimal {
            assert!(!our_runsc_processes().is_empty(), "runsc runs the sandbox");
        }
        e.shutdown();
        for p in pending {
            let err = p.wait().unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err}");
        }
        assert_eq!(children_of_self(), Vec::<String>::new(), "runner and workers are gone");
        // `runsc delete --force` has killed the sandbox's processes; those that are
        // not our children may take a moment to be gone from /proc.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !our_runsc_processes().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(our_runsc_processes(), Vec::<String>::new(), "no runsc process left 5 s after the shutdown");
        assert_eq!(fd_count(), fds_before, "no fd leaked");
        let tmp_after: Vec<_> = std::fs::read_dir("/tmp").unwrap().flatten().map(|e| e.file_name()).collect();
        let new: Vec<_> = tmp_after.iter().filter(|n| !tmp_before.contains(n)).collect();
        assert!(new.is_empty(), "no temp files left: {new:?}");
    }
}
