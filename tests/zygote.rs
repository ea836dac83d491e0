//! Zygote start (`LoadOptions::zygote`, minimal mode): workers forked from a
//! pre-main template keep every isolation promise of exec'd workers, the engine's
//! features work on them, and binaries that would run their own code in the
//! template are refused with the reason.

mod common;

use common::*;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Code, CodeToken, Engine, LoadOptions, Mode, SyscallFilter};

fn zygote(e: &Engine, name: &str, workers: usize) -> CodeToken {
    zygote_with(e, name, LoadOptions { workers, ..Default::default() })
}

fn zygote_with(e: &Engine, name: &str, options: LoadOptions) -> CodeToken {
    e.load(sample(name), LoadOptions { zygote: true, ..options }).unwrap_or_else(|err| panic!("zygote load {name}: {err}"))
}

#[test]
fn zygote_workers_answer_every_execution() {
    let e = engine(Mode::Minimal);
    let t = zygote(&e, "hello_world", 4);
    for i in 0..200 {
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "execution {i}");
    }
    // Concurrently too.
    let pending: Vec<_> =
        (0..64).map(|_| e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap()).collect();
    for p in pending {
        assert_eq!(p.wait().unwrap().response.greeting, "Hello, world!");
    }
}

#[test]
fn zygote_workers_keep_the_isolation_promises() {
    for filter in [SyscallFilter::Untrusted, SyscallFilter::No] {
        let e = engine_with(Mode::Minimal, filter);
        let t = zygote(&e, "probe", 2);
        let exec = load(&e, "probe", 1);
        assert_eq!(probe(&e, &t, "capabilities", ""), "eff=0 prm=0 inh=0", "{filter:?}");
        assert_eq!(probe(&e, &t, "kill_parent", ""), "ESRCH", "{filter:?}: alone in its PID namespace");
        assert_eq!(probe(&e, &t, "uid", ""), probe(&e, &exec, "uid", ""), "{filter:?}");
        assert_eq!(probe(&e, &t, "open_fds", ""), "0,1,2,3", "{filter:?}: nothing of the template's");
        // The environment and arguments an exec'd worker gets: no LD_PRELOAD.
        assert_eq!(probe(&e, &t, "environ", ""), "", "{filter:?}");
        assert_eq!(probe(&e, &t, "environ", ""), probe(&e, &exec, "environ", ""), "{filter:?}");
        assert_eq!(probe(&e, &t, "argv", ""), probe(&e, &exec, "argv", ""), "{filter:?}");
        let create = probe(&e, &t, "create_file", "/udf-was-here");
        assert_ne!(create, "ok", "{filter:?}: the root is read-only");
        assert_eq!(create, probe(&e, &exec, "create_file", "/udf-was-here"), "{filter:?}");
        assert_eq!(probe(&e, &t, "unshare_user", ""), probe(&e, &exec, "unshare_user", ""), "{filter:?}");
        assert_eq!(probe(&e, &t, "fork", ""), probe(&e, &exec, "fork", ""), "{filter:?}");
        if filter == SyscallFilter::Untrusted {
            // The template may clone (with the gate's key); its children may not.
            assert_eq!(probe(&e, &t, "fork", ""), "EPERM");
        }
        // Nothing passes between executions: each child starts from the pristine
        // template, whatever the previous one wrote.
        for i in 0..6 {
            assert_eq!(probe(&e, &t, "memory_residue", ""), "clean", "{filter:?}, execution {i}");
        }
        assert_eq!(probe(&e, &t, "msgq_put", ""), if filter == SyscallFilter::No { "ok" } else { "EPERM" });
        if filter == SyscallFilter::No {
            assert_eq!(probe(&e, &t, "msgq_get", ""), "ENOENT", "a worker's IPC namespace is its own");
        }
    }
}

#[test]
fn zygote_workers_capture_logs_and_use_shared_memory() {
    let e = engine(Mode::Minimal);
    let t = zygote_with(&e, "log_udf", LoadOptions { workers: 1, log_egress: true, ..Default::default() });
    for _ in 0..3 {
        let r = e.execute::<_, SampleResponse>(&t, &SampleRequest::default(), opts()).unwrap().wait().unwrap();
        let logs = r.logs.unwrap();
        assert_eq!(String::from_utf8_lossy(&logs.stdout), "I am a stdout log.\n");
        assert_eq!(String::from_utf8_lossy(&logs.stderr), "I am a stderr log.\n");
    }
    let logged = e.load_for_logging(&zygote(&e, "probe", 1), 1).unwrap();
    assert_eq!(probe(&e, &logged, "open_fds", ""), "0,1,2,3");
    let shm = zygote_with(&e, "probe", LoadOptions { workers: 2, shared_memory: Some(1 << 16), ..Default::default() });
    for _ in 0..3 {
        assert_eq!(probe(&e, &shm, "open_fds", ""), "0,1,2,3,4");
        assert!(probe(&e, &shm, "shm_residue", "").starts_with("clean"));
        assert!(probe(&e, &shm, "shm_fill", "").starts_with("filled"));
    }
}

#[test]
fn failing_zygote_workers_fail_their_execution() {
    let e = engine(Mode::Minimal);
    let good = zygote(&e, "hello_world", 1);
    check_failing_udfs(&e, &good, |name| zygote(&e, name, 1));
}

#[test]
fn unfit_binaries_are_refused_with_the_reason() {
    let e = engine(Mode::Minimal);
    for (name, needle) in [
        ("hello_world_static", "statically linked"),
        ("hello_nolibc", "statically linked"),
        ("zygote_ifunc", "IRELATIVE"),
        ("zygote_preinit", "DT_PREINIT_ARRAY"),
        ("zygote_malloc", "exports symbol"),
    ] {
        let err = e.load(sample(name), LoadOptions { zygote: true, ..Default::default() }).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err}");
        assert!(err.message().contains(needle) && err.message().contains("zygote"), "{name}: {err}");
        // The same binary loads and runs without zygote start.
        let t = load(&e, name, 1);
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "{name} without zygote start");
    }
}

#[test]
fn zygote_start_is_minimal_mode_only() {
    if !modes().contains(&Mode::Gvisor) {
        return;
    }
    let e = engine(Mode::Gvisor);
    let err = e.load(sample("hello_world"), LoadOptions { zygote: true, ..Default::default() }).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("minimal mode only"), "{err}");
}

/// Deleting a zygote token ends its template and workers: no process of it stays.
#[test]
fn delete_ends_the_template_and_its_workers() {
    let e = engine(Mode::Minimal);
    let count = || -> usize {
        runner_threads(e.sandbox_pid(), 0, |p| std::fs::metadata(p).ok().map(|_| p.to_string()))
            .iter()
            .map(|(_, _, children)| children.len())
            .sum()
    };
    let t = zygote(&e, "hello_world", 3);
    assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    // Three workers and at least one template (one per engine shard that spawned).
    let poll_until = |done: &dyn Fn(usize) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(count()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    poll_until(&|n| n >= 4);
    assert!(count() >= 4, "processes: {}", count());
    e.delete(&t).unwrap();
    poll_until(&|n| n == 0);
    assert_eq!(count(), 0, "template and workers are reaped after delete");
}

/// A template that dies is started again at the next spawn: executions go on.
#[test]
fn a_dead_template_is_replaced() {
    let e = engine(Mode::Minimal);
    let t = zygote(&e, "hello_world", 2);
    assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    // Templates live in the runner's PID namespace, workers each in their own; a
    // worker is its connection thread's child (CLONE_PARENT), as is the template.
    let runner_ns = std::fs::read_link(format!("/proc/{}/ns/pid", e.sandbox_pid())).unwrap();
    // Per runner thread: its templates' pids and how many workers it has.
    let children = || -> Vec<(Vec<String>, usize)> {
        runner_threads(e.sandbox_pid(), 0, |p| {
            let pid = p.trim_start_matches("/proc/").trim_end_matches("/status").to_string();
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
            Some((ns == runner_ns, pid))
        })
        .into_iter()
        .map(|(_, _, kids)| {
            let (templates, workers): (Vec<_>, Vec<_>) = kids.into_iter().partition(|(template, _)| *template);
            (templates.into_iter().map(|(_, pid)| pid).collect(), workers.len())
        })
        .collect()
    };
    let templates = || -> Vec<String> { children().into_iter().flat_map(|(t, _)| t).collect() };
    // Only once the pool is whole and nothing has changed for 200 ms: a template
    // still starting is not yet the runner's (its start would fail, and the
    // execution waiting on it with it), and one killed while it forks a refill
    // fails that spawn (not retried on the same channel: see `zygote_spawn`).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut last, mut since) = (children(), std::time::Instant::now());
    let before: Vec<String> = loop {
        std::thread::sleep(std::time::Duration::from_millis(10));
        let c = children();
        if c != last {
            (last, since) = (c, std::time::Instant::now());
            continue;
        }
        let workers: usize = c.iter().map(|(_, w)| *w).sum();
        let settled = workers == 2
            && c.iter().any(|(t, _)| !t.is_empty())
            && c.iter().all(|(t, workers)| t.is_empty() || *workers > 0);
        if (settled && since.elapsed() >= std::time::Duration::from_millis(200)) || std::time::Instant::now() > deadline {
            break c.into_iter().flat_map(|(t, _)| t).collect();
        }
    };
    assert!(!before.is_empty(), "a template runs");
    for pid in &before {
        // SAFETY: signalling a process of this test's own sandbox.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    }
    for i in 0..20 {
        assert_eq!(hello(&e, &t).unwrap(), "Hello, world!", "execution {i} after the templates died");
    }
    let after = templates();
    assert!(!after.is_empty() && after.iter().all(|p| !before.contains(p)), "new templates: {before:?} -> {after:?}");
}
