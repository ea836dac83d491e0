//! Isolation promises (DESIGN §6), each checked by the probe UDF, in every
//! available mode.

mod common;

use common::*;
use roma_byob::{Mode, SyscallFilter};

#[test]
fn no_capabilities() {
    for mode in modes() {
        for filter in [SyscallFilter::No, SyscallFilter::Untrusted] {
            let e = engine_with(mode, filter);
            let t = load(&e, "probe", 1);
            assert_eq!(probe(&e, &t, "capabilities", ""), "eff=0 prm=0 inh=0", "{filter:?}");
        }
    }
}

#[test]
fn filesystem_is_read_only_and_holds_only_the_library_mounts() {
    for mode in modes() {
        // With no seccomp filter, so the read-only root itself is what stops writes.
        let e = engine_with(mode, SyscallFilter::No);
        let t = load(&e, "probe", 1);
        assert_eq!(probe(&e, &t, "create_file", "/udf-was-here"), "EROFS");
        assert_eq!(probe(&e, &t, "create_file", "/lib/udf-was-here"), "EROFS");
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        assert_eq!(probe(&e, &t, "stat_path", libc), "ok", "the library mounts are visible");
        let edit = probe(&e, &t, "edit_file", libc);
        assert!(edit == "EROFS" || edit == "EACCES", "edit: {edit}");
        let del = probe(&e, &t, "delete_file", libc);
        assert!(del == "EROFS" || del == "EACCES", "delete: {del}");
        // Of /etc, only the dynamic loader's cache (a default library mount), and
        // read-only like the rest; without it on the host, no /etc at all.
        let cache = std::path::Path::new("/etc/ld.so.cache").is_file();
        if cache {
            assert_eq!(probe(&e, &t, "list_dir", "/etc"), "ld.so.cache");
            assert_eq!(probe(&e, &t, "create_file", "/etc/udf-was-here"), "EROFS");
            let edit = probe(&e, &t, "edit_file", "/etc/ld.so.cache");
            assert!(edit == "EROFS" || edit == "EACCES", "edit: {edit}");
        }
        let etc = if cache { "etc," } else { "" };
        match mode {
            Mode::Minimal => {
                // roma-zygote.so: the zygote shim (`LoadOptions::zygote`), read-only.
                assert_eq!(probe(&e, &t, "list_dir", "/"), format!("{etc}lib,lib64,roma-zygote.so,usr"));
                for hidden in ["/proc", "/dev", "/tmp", "/root"] {
                    assert_eq!(probe(&e, &t, "stat_path", hidden), "ENOENT", "{hidden} must not exist");
                }
            }
            Mode::Gvisor | Mode::GvisorDebug => {
                // The container root: libraries, the runner binary, gVisor's read-only
                // /dev nodes, and empty read-only /proc, /sys and /tmp.
                assert_eq!(
                    probe(&e, &t, "list_dir", "/"),
                    format!("dev,{etc}lib,lib64,proc,roma-byob-runner,sys,tmp,usr")
                );
                for empty in ["/proc", "/sys", "/tmp", "/dev/shm"] {
                    assert_eq!(probe(&e, &t, "list_dir", empty), "", "{empty} must be empty");
                }
                for path in ["/dev/udf-was-here", "/dev/shm/udf-was-here", "/tmp/udf-was-here", "/proc/udf-was-here"] {
                    assert_eq!(probe(&e, &t, "create_file", path), "EROFS", "{path}");
                }
                assert_eq!(probe(&e, &t, "stat_path", "/root"), "ENOENT", "/root must not exist");
            }
        }
        // Under the default filter the same attempts are refused too.
        let strict = engine(mode);
        let t = load(&strict, "probe", 1);
        assert_ne!(probe(&strict, &t, "create_file", "/udf-was-here"), "ok");
        assert_ne!(probe(&strict, &t, "delete_file", libc), "ok");
        assert_ne!(probe(&strict, &t, "edit_file", libc), "ok");
    }
}

#[test]
fn host_paths_and_sockets_are_not_visible() {
    for mode in modes() {
        let e = engine_with(mode, SyscallFilter::No);
        let t = load(&e, "probe", 1);
        // The engine talks to workers over inherited socketpairs only: there is no
        // socket file at all. Nothing of the host's tree is reachable either.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(probe(&e, &t, "stat_path", exe.to_str().unwrap()), "ENOENT");
        assert_eq!(probe(&e, &t, "stat_path", "/run"), "ENOENT");
        assert_eq!(probe(&e, &t, "stat_path", "/var/run"), "ENOENT");
        // No network. minimal: the runner's network namespace has no usable
        // interface. gVisor: runsc --network=none, and each worker has a network
        // namespace of its own (its loopback reaches nobody else).
        let net = probe(&e, &t, "network", "");
        assert_ne!(net, "ok", "network must be unreachable");
        if mode == Mode::Minimal {
            assert_ne!(net, "ECONNREFUSED", "loopback must not be reachable");
        }
    }
}

#[test]
fn sysv_message_queue_is_not_shared_between_executions() {
    for mode in modes() {
        let e = engine_with(mode, SyscallFilter::No);
        let t = load(&e, "probe", 2);
        assert_eq!(probe(&e, &t, "msgq_put", ""), "ok", "a queue can be created in the worker's own IPC namespace");
        assert_eq!(probe(&e, &t, "msgq_get", ""), "ENOENT", "the next execution must not see it");
        // Under the default filter SysV IPC is refused outright.
        let strict = engine(mode);
        let t = load(&strict, "probe", 1);
        assert_eq!(probe(&strict, &t, "msgq_put", ""), "EPERM");
    }
}

#[test]
fn each_worker_is_alone_in_its_pid_namespace() {
    for mode in modes() {
        let e = engine_with(mode, SyscallFilter::No);
        let t = load(&e, "probe", 2);
        // pid 1 of its own namespace: no parent visible, nobody else to signal.
        assert_eq!(probe(&e, &t, "kill_parent", ""), "ESRCH");
        assert_eq!(probe(&e, &t, "uid", ""), "uid=65534", "unmapped user: nobody");
    }
}

/// Level `no`: sockets, fork and io_uring work (namespaces, no capabilities and the
/// read-only root still isolate). `worker-engine`: the runner's denylist (io_uring,
/// unshare, mount, ptrace, bpf, ...) applies to workers too; other syscalls work.
/// `untrusted`: a default-deny allowlist; sockets, fork, SysV IPC and kill fail with
/// EPERM. A new user namespace is refused at every level: the worker's uid is
/// unmapped.
#[test]
fn syscall_filter_levels_behave_as_documented() {
    for mode in modes() {
        let expect = [
            (SyscallFilter::No, "ok", "ok", "ok"),
            (SyscallFilter::WorkerEngine, "ok", "EPERM", "ok"),
            (SyscallFilter::Untrusted, "EPERM", "EPERM", "EPERM"),
        ];
        for (filter, socket, io_uring, fork) in expect {
            let e = engine_with(mode, filter);
            let t = load(&e, "probe", 1);
            assert_eq!(probe(&e, &t, "socket", ""), socket, "{filter:?} socket");
            assert_eq!(probe(&e, &t, "io_uring", ""), io_uring, "{filter:?} io_uring");
            assert_eq!(probe(&e, &t, "fork", ""), fork, "{filter:?} fork");
            assert_eq!(probe(&e, &t, "unshare_user", ""), "EPERM", "{filter:?} unshare");
            // Every level still runs ordinary UDFs.
            let h = load(&e, "hello_world", 1);
            assert_eq!(hello(&e, &h).unwrap(), "Hello, world!");
        }
    }
}

#[test]
fn library_mounts_may_live_under_tmp_and_be_single_files() {
    use roma_byob::{Config, Engine};
    for mode in modes() {
        // A library directory under /tmp (the runner's scratch mount point in
        // minimal mode) and a single file.
        let dir = std::env::temp_dir().join(format!("roma-byob-libs-{}-{}", std::process::id(), mode.as_str()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/data.txt"), "x").unwrap();
        std::fs::write(dir.join("single.txt"), "y").unwrap();
        let mut lib_mounts = Config::default().lib_mounts;
        lib_mounts.push(dir.join("sub"));
        lib_mounts.push(dir.join("single.txt"));
        let e = Engine::new(Config { mode, lib_mounts, syscall_filter: SyscallFilter::No, ..Default::default() }).unwrap();
        let t = load(&e, "probe", 1);
        let sub = dir.join("sub");
        assert_eq!(probe(&e, &t, "list_dir", sub.to_str().unwrap()), "data.txt", "{mode:?}");
        assert_eq!(probe(&e, &t, "stat_path", dir.join("single.txt").to_str().unwrap()), "ok", "{mode:?}");
        assert_eq!(probe(&e, &t, "create_file", sub.join("new").to_str().unwrap()), "EROFS", "{mode:?}");
        drop(e);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_worker_holds_only_its_own_descriptors() {
    use roma_byob::LoadOptions;
    for mode in modes() {
        let e = engine(mode);
        // Other pools alive meanwhile: their channels' ends, and the stock, are open
        // in the runner when these workers start.
        let others = load(&e, "hello_world", 8);
        assert_eq!(hello(&e, &others).unwrap(), "Hello, world!");
        let plain = load(&e, "probe", 4);
        for i in 0..6 {
            // stdin, stdout, stderr and the channel, nothing of the runner's.
            assert_eq!(probe(&e, &plain, "open_fds", ""), "0,1,2,3", "{mode:?}, execution {i}");
        }
        let logged = e.load(sample("probe"), LoadOptions { workers: 2, log_egress: true, ..Default::default() }).unwrap();
        assert_eq!(probe(&e, &logged, "open_fds", ""), "0,1,2,3", "{mode:?}, log capture");
        let shm = e.load(sample("probe"), LoadOptions { workers: 2, shared_memory: Some(1 << 16), ..Default::default() }).unwrap();
        assert_eq!(probe(&e, &shm, "open_fds", ""), "0,1,2,3,4", "{mode:?}, shared memory");
        // And again plain, after workers with logs and shared memory started.
        assert_eq!(probe(&e, &plain, "open_fds", ""), "0,1,2,3", "{mode:?}, plain again");
    }
}
