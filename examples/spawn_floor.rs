//! The floor of the worker spawn path on this machine: how many workers per second the
//! bare kernel recipe allows, per core and on all cores, so that the engine's
//! throughput (`roma-byob demo`) can be compared with it (DESIGN §4).
//!
//! Every spawn creates a process that execs a tiny static binary which exits 0 at
//! once; the parent reaps it. The binary is a 129-byte x86_64 ELF built here by hand
//! (no C compiler needed), written to a memfd and run with
//! `execveat(memfd, "", argv, envp, AT_EMPTY_PATH)`, as the engine runs UDF binaries.
//! Recipes, cheapest last-but-one:
//!
//! 1. `fork + exec`: `fork()`, child `execveat`.
//! 2. `vfork + exec`: `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` onto a private stack.
//! 3. `+ user, PID, UTS namespaces`: recipe 2 plus `CLONE_NEWUSER | CLONE_NEWPID |
//!    CLONE_NEWUTS` (namespace set-up and teardown, partly deferred to kworkers).
//! 4. `+ capset, no_new_privs, close_range`: recipe 3 plus what the engine's worker
//!    does in the child before exec (`src/udf_runner/spawn.rs`): drop every
//!    capability, set no_new_privs, mark fds close-on-exec. No seccomp filter: the
//!    engine's workers inherit theirs and load none. (The engine's child also makes a
//!    few `dup2`s and `prctl(PR_SET_PDEATHSIG)`, a few µs more.)
//! 5. `4 without the user namespace`: what a per-worker user namespace costs
//!    (needs CAP_SYS_ADMIN: root). Not a recipe the engine may use as is: see
//!    BENCHMARKS.md, fifth session, for what replacing it would take.
//! 6. `zygote`: zygote start (`LoadOptions::zygote`): each thread execs the UDF once
//!    as a template with the engine's shim preloaded, and every spawn is a fork of
//!    it in fresh user, PID and UTS namespaces with capabilities dropped
//!    (`src/udf_runner/zygote_shim.c`). Needs `--binary` with a dynamically linked
//!    glibc UDF.
//!
//! For each recipe: N spawns in one thread pinned to the first allowed core (µs per
//! spawn, wall time, p50/p99), then N spawns in each of one thread per allowed core,
//! each pinned to its core, all started together (spawns/s on all cores). Children
//! inherit the pinning, as workers of the engine's thread-per-core runner do. For
//! both runs, the system-wide CPU time per spawn from `/proc/stat` (user + nice +
//! system + irq + softirq), read again 200 ms after the run so that work the kernel
//! defers to kworkers (namespace teardown) is counted; it also counts anything else
//! running on the machine.
//!
//! `cargo run --release --example spawn_floor [-- --spawns N] [--recipe NAME] [--binary UDF]`
//! (N per thread, default 4000; NAME one of fork, vfork, ns, worker, worker-no-userns,
//! zygote).
//!
//! `--binary UDF` runs a real UDF instead of the tiny binary, with its whole
//! conversation and no engine: for each spawn a socketpair whose far end the child
//! gets as fd 3 (`argv[1]` = "3"), with an empty request already written to it; the
//! UDF sends its ready byte, reads the request, answers and exits, and the parent
//! checks that an answer came before it counts the spawn. That is the machine's
//! floor for that UDF (its start-up, e.g. glibc's, included), to set beside
//! `roma-byob demo --binary UDF`.

#[cfg(target_arch = "x86_64")]
mod floor {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    /// Private stack of a `CLONE_VM` child (recipes 2-4).
    const STACK_SIZE: usize = 64 * 1024;
    /// Unmeasured spawns before each run (page cache, allocator, kernel caches).
    const WARM_UP: usize = 50;

    /// A minimal static x86_64 ELF executable that calls `exit(0)`: the ELF header,
    /// one `PT_LOAD` program header mapping the whole file at 0x400000, and 9 bytes
    /// of code. No sections, no interpreter, no libc.
    pub fn tiny_elf() -> Vec<u8> {
        const EHDR_SIZE: u16 = 64;
        const PHDR_SIZE: u16 = 56;
        const BASE: u64 = 0x40_0000;
        // mov eax, 60 (SYS_exit); xor edi, edi (status 0); syscall
        const CODE: [u8; 9] = [0xb8, 0x3c, 0x00, 0x00, 0x00, 0x31, 0xff, 0x0f, 0x05];
        let code_offset = u64::from(EHDR_SIZE + PHDR_SIZE);
        let file_size = code_offset + CODE.len() as u64;

        let mut elf = Vec::with_capacity(file_size as usize);
        // --- ELF header (Elf64_Ehdr, 64 bytes) ---
        elf.extend_from_slice(b"\x7fELF"); // e_ident[EI_MAG0..3]: magic
        elf.push(2); // e_ident[EI_CLASS] = ELFCLASS64
        elf.push(1); // e_ident[EI_DATA] = ELFDATA2LSB (little endian)
        elf.push(1); // e_ident[EI_VERSION] = EV_CURRENT
        elf.push(0); // e_ident[EI_OSABI] = ELFOSABI_SYSV
        elf.push(0); // e_ident[EI_ABIVERSION]
        elf.extend_from_slice(&[0; 7]); // e_ident[EI_PAD]: up to 16 bytes
        elf.extend_from_slice(&2u16.to_le_bytes()); // e_type = ET_EXEC
        elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine = EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes()); // e_version = EV_CURRENT
        elf.extend_from_slice(&(BASE + code_offset).to_le_bytes()); // e_entry: the code
        elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff: right after
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no section headers
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_ehsize
        elf.extend_from_slice(&PHDR_SIZE.to_le_bytes()); // e_phentsize
        elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum: one program header
        elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize (unused: e_shnum = 0)
        elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx = SHN_UNDEF
        assert_eq!(elf.len(), usize::from(EHDR_SIZE));
        // --- Program header (Elf64_Phdr, 56 bytes): map the whole file R+X ---
        elf.extend_from_slice(&1u32.to_le_bytes()); // p_type = PT_LOAD
        elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags = PF_R | PF_X
        elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset: from the file's start
        elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr (ignored)
        elf.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
        elf.extend_from_slice(&file_size.to_le_bytes()); // p_memsz (no .bss)
        elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align: page
        assert_eq!(elf.len() as u64, code_offset);
        // --- Code ---
        elf.extend_from_slice(&CODE);
        elf
    }

    /// Writes `tiny_elf()` into a close-on-exec memfd and returns the fd.
    fn tiny_elf_memfd() -> io::Result<RawFd> {
        memfd_with(&tiny_elf())
    }

    /// Copies the file at `path` into a close-on-exec memfd (as the engine loads a
    /// UDF) and returns the fd.
    fn binary_memfd(path: &str) -> io::Result<RawFd> {
        memfd_with(&std::fs::read(path)?)
    }

    fn memfd_with(bytes: &[u8]) -> io::Result<RawFd> {
        // SAFETY: the name is NUL-terminated; memfd_create returns a fresh fd or -1.
        let fd = unsafe { libc::memfd_create(c"spawn-floor".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: writing our own buffer to our own fresh fd.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written != bytes.len() as isize {
            return Err(io::Error::other("short write to the memfd"));
        }
        // Above fd 3, which a UDF child gets its socket as.
        // SAFETY: duplicating our own fd; the original is closed once copied.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        let err = io::Error::last_os_error();
        // SAFETY: closing the fd made above.
        unsafe { libc::close(fd) };
        if high < 0 {
            return Err(err);
        }
        Ok(high)
    }

    #[derive(Clone, Copy)]
    enum Kind {
        Fork,
        /// `clone(CLONE_VM | CLONE_VFORK | SIGCHLD | flags)`; `harden`: capset,
        /// no_new_privs and close_range in the child before exec.
        Vfork {
            flags: libc::c_int,
            harden: bool,
        },
        /// Fork of a pre-main template (`src/udf_runner/zygote.rs`).
        Zygote,
    }

    #[derive(Clone, Copy)]
    struct Recipe {
        name: &'static str,
        label: &'static str,
        kind: Kind,
    }

    const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWUTS;

    const RECIPES: [Recipe; 6] = [
        Recipe {
            name: "fork",
            label: "fork + exec",
            kind: Kind::Fork,
        },
        Recipe {
            name: "vfork",
            label: "vfork + exec",
            kind: Kind::Vfork {
                flags: 0,
                harden: false,
            },
        },
        Recipe {
            name: "ns",
            label: "+ user, PID, UTS namespaces",
            kind: Kind::Vfork {
                flags: NAMESPACES,
                harden: false,
            },
        },
        Recipe {
            name: "worker",
            label: "+ capset, no_new_privs, close_range",
            kind: Kind::Vfork {
                flags: NAMESPACES,
                harden: true,
            },
        },
        Recipe {
            name: "worker-no-userns",
            label: "4 without the user namespace",
            kind: Kind::Vfork {
                flags: libc::CLONE_NEWPID | libc::CLONE_NEWUTS,
                harden: true,
            },
        },
        Recipe {
            name: "zygote",
            label: "zygote: fork of a pre-main template",
            kind: Kind::Zygote,
        },
    ];

    /// What the child execs.
    #[derive(Clone, Copy)]
    struct Exe {
        fd: RawFd,
        /// A UDF (`--binary`): it gets a socket as fd 3, holding its request.
        udf: bool,
    }

    /// Shared with a `CLONE_VM` child: what it needs, and what failed, if anything.
    #[repr(C)]
    struct ChildCtx {
        exe: RawFd,
        /// The UDF's end of its socket (made fd 3), or -1.
        channel: RawFd,
        argv: [*const libc::c_char; 3],
        envp: [*const libc::c_char; 1],
        harden: bool,
        failed_step: &'static str,
        errno: libc::c_int,
    }

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }

    #[repr(C)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    /// `_LINUX_CAPABILITY_VERSION_3`: two `CapData` (capabilities 0-63).
    const CAP_VERSION_3: u32 = 0x2008_0522;

    fn errno() -> libc::c_int {
        // SAFETY: reading the thread's errno location is always valid.
        unsafe { *libc::__errno_location() }
    }

    /// Child of recipes 2-4. It shares the parent's memory (and, through glibc's
    /// `clone`, its thread's TLS, so errno lands in the suspended parent's errno),
    /// so it makes raw syscalls only: no allocation, no locks.
    extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's ChildCtx, alive and untouched until the parent
        // resumes (CLONE_VFORK: when this child execs or exits).
        let ctx = unsafe { &mut *arg.cast::<ChildCtx>() };
        macro_rules! step {
            ($name:expr, $e:expr) => {
                if $e < 0 {
                    ctx.failed_step = $name;
                    ctx.errno = errno();
                    libc::_exit(127);
                }
            };
        }
        // SAFETY (whole block): raw syscalls on this process's own attributes and fds;
        // every pointer passed points into ctx or to locals that outlive the call.
        unsafe {
            // The child has its own fd table (no CLONE_FILES): the parent's fd 3 is
            // untouched. dup2 leaves the new fd without close-on-exec.
            // (`memfd_with` keeps the binary's fd above 3.)
            if ctx.channel == 3 {
                step!("fcntl(F_SETFD)", libc::fcntl(3, libc::F_SETFD, 0));
            } else if ctx.channel >= 0 {
                step!("dup2", libc::dup2(ctx.channel, 3));
            }
            let first_closed = if ctx.channel >= 0 { 4 } else { 3 };
            if ctx.harden {
                let mut header = CapHeader {
                    version: CAP_VERSION_3,
                    pid: 0,
                };
                let data = [
                    CapData {
                        effective: 0,
                        permitted: 0,
                        inheritable: 0,
                    },
                    CapData {
                        effective: 0,
                        permitted: 0,
                        inheritable: 0,
                    },
                ];
                step!(
                    "capset",
                    libc::syscall(
                        libc::SYS_capset,
                        &mut header as *mut CapHeader,
                        data.as_ptr()
                    )
                );
                step!(
                    "prctl(NO_NEW_PRIVS)",
                    libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                );
                // Upper bound INT_MAX as the engine does (gVisor rejects UINT_MAX).
                step!(
                    "close_range",
                    libc::syscall(
                        libc::SYS_close_range,
                        first_closed,
                        i32::MAX,
                        libc::CLOSE_RANGE_CLOEXEC
                    )
                );
            }
            libc::syscall(
                libc::SYS_execveat,
                ctx.exe,
                c"".as_ptr(),
                ctx.argv.as_ptr(),
                ctx.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            ctx.failed_step = "execveat";
            ctx.errno = errno();
            libc::_exit(127)
        }
    }

    /// One thread's spawner: owns its child stack.
    struct Spawner {
        kind: Kind,
        exe: Exe,
        stack: Vec<u128>,
        /// Recipe 6: the template's pid and our end of its control socket.
        template: Option<(libc::pid_t, OwnedFd)>,
    }

    impl Drop for Spawner {
        fn drop(&mut self) {
            if let Some((pid, ctl)) = self.template.take() {
                // End of file on its control socket: the template exits.
                drop(ctl);
                let _ = reap(pid);
            }
        }
    }

    /// The engine's zygote shim, written once to a file for `LD_PRELOAD`.
    fn shim_path() -> Result<&'static std::path::Path, String> {
        static PATH: std::sync::OnceLock<Result<std::path::PathBuf, String>> = std::sync::OnceLock::new();
        PATH.get_or_init(|| {
            let path = std::env::temp_dir().join(format!("roma-zygote-floor-{}.so", std::process::id()));
            std::fs::write(&path, roma_byob::udf_runner::zygote::SHIM)
                .map(|()| path.clone())
                .map_err(|e| format!("write {}: {e}", path.display()))
        })
        .as_ref()
        .map(|p| p.as_path())
        .map_err(|e| e.clone())
    }

    /// Recipe 6: execs the UDF as a template (fd 3 its control socket, fd 4 a
    /// placeholder, the shim preloaded) and sends it its set-up (no gate key, no
    /// namespace beyond user/PID/UTS, no log limit).
    fn start_template(exe: RawFd) -> Result<(libc::pid_t, OwnedFd), String> {
        let preload = std::ffi::CString::new(format!("LD_PRELOAD={}", shim_path()?.display()))
            .map_err(|_| "shim path has a NUL byte".to_string())?;
        let (ctl, theirs) = roma_byob::ipc::fdpass::stream_pair().map_err(|e| format!("socketpair: {e}"))?;
        let argv = [c"udf".as_ptr(), c"3".as_ptr(), std::ptr::null()];
        let envp = [preload.as_ptr(), std::ptr::null()];
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: the child only makes raw syscalls on data prepared before the fork
        // and leaves with _exit if exec fails.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if libc::dup2(theirs_fd, 3) < 0 || null < 0 || libc::dup2(null, 4) < 0 {
                    libc::_exit(127)
                }
                libc::syscall(libc::SYS_execveat, exe, c"".as_ptr(), argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH);
                libc::_exit(127)
            }
        }
        if pid < 0 {
            return Err(format!("fork: {}", io::Error::last_os_error()));
        }
        drop(theirs);
        let setup = [0u8; 24];
        roma_byob::ipc::fdpass::send_with_fds(ctl.as_raw_fd(), &setup, &[]).map_err(|e| format!("template set-up: {e}"))?;
        Ok((pid, ctl))
    }

    /// Recipe 6: one worker forked by the template on `channel`; its pid.
    fn zygote_fork(ctl: &OwnedFd, channel: RawFd) -> Result<libc::pid_t, String> {
        roma_byob::ipc::fdpass::send_with_fds(ctl.as_raw_fd(), &[0u8], &[channel])
            .map_err(|e| format!("spawn order: {e}"))?;
        let mut reply = [0u8; 4];
        // SAFETY: reading into a local buffer from our own socket (a 4-byte reply
        // arrives in one piece on a stream socket in practice; short reads fail).
        let n = unsafe { libc::read(ctl.as_raw_fd(), reply.as_mut_ptr().cast(), 4) };
        if n != 4 {
            return Err(format!(
                "the template did not answer (read {n}): is the UDF a dynamically linked glibc binary (--binary)?"
            ));
        }
        let pid = i32::from_ne_bytes(reply);
        if pid < 0 {
            return Err(format!("template clone: {}", io::Error::from_raw_os_error(-pid)));
        }
        Ok(pid)
    }

    /// After the UDF exited: its ready byte and at least a one-byte answer frame
    /// must be waiting on the parent's end.
    fn check_answer(host: &OwnedFd) -> Result<(), String> {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer from our own fd.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 2 {
            return Err(format!("the UDF did not answer (read {n} bytes; it should send its ready byte and a response)"));
        }
        Ok(())
    }

    impl Spawner {
        fn new(kind: Kind, exe: Exe) -> Spawner {
            // u128 keeps the stack (and its top) 16-byte aligned.
            Spawner {
                kind,
                exe,
                stack: vec![0u128; STACK_SIZE / 16],
                template: None,
            }
        }

        /// Spawns one child that execs the binary, and reaps it.
        fn spawn(&mut self) -> Result<(), String> {
            let channel = if self.exe.udf {
                let (host, child) = roma_byob::ipc::fdpass::stream_pair().map_err(|e| format!("socketpair: {e}"))?;
                // The request: an empty message, length-delimited (one zero byte).
                // SAFETY: writing a local byte to our own socket.
                if unsafe { libc::write(host.as_raw_fd(), [0u8].as_ptr().cast(), 1) } != 1 {
                    return Err(format!("write request: {}", io::Error::last_os_error()));
                }
                Some((host, child))
            } else {
                None
            };
            let child_fd = channel.as_ref().map_or(-1, |(_, c)| c.as_raw_fd());
            let argv = if self.exe.udf {
                [c"udf".as_ptr(), c"3".as_ptr(), std::ptr::null()]
            } else {
                [c"exit0".as_ptr(), std::ptr::null(), std::ptr::null()]
            };
            let envp = [std::ptr::null()];
            let pid = match self.kind {
                Kind::Zygote => {
                    if !self.exe.udf {
                        return Err("needs --binary with a dynamically linked glibc UDF".into());
                    }
                    if self.template.is_none() {
                        self.template = Some(start_template(self.exe.fd)?);
                    }
                    let (_, ctl) = self.template.as_ref().ok_or("no template")?;
                    zygote_fork(ctl, child_fd)?
                }
                Kind::Fork => {
                    // SAFETY: the child only makes raw syscalls on data prepared before
                    // the fork (argv, envp, the fd) and leaves with _exit.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: as above.
                        unsafe {
                            // As in `child_main`: fd 3 must be the socket, without
                            // close-on-exec.
                            let moved = match child_fd {
                                3 => libc::fcntl(3, libc::F_SETFD, 0),
                                fd if fd >= 0 => libc::dup2(fd, 3),
                                _ => 0,
                            };
                            if moved < 0 {
                                libc::_exit(127)
                            }
                            libc::syscall(
                                libc::SYS_execveat,
                                self.exe.fd,
                                c"".as_ptr(),
                                argv.as_ptr(),
                                envp.as_ptr(),
                                libc::AT_EMPTY_PATH,
                            );
                            libc::_exit(127)
                        }
                    }
                    if pid < 0 {
                        return Err(format!("fork: {}", io::Error::last_os_error()));
                    }
                    pid
                }
                Kind::Vfork { flags, harden } => {
                    let mut ctx = ChildCtx {
                        exe: self.exe.fd,
                        channel: child_fd,
                        argv,
                        envp,
                        harden,
                        failed_step: "",
                        errno: 0,
                    };
                    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | flags;
                    // SAFETY: the stack top is the end of our own 16-byte aligned
                    // allocation; with CLONE_VFORK this thread is suspended until the
                    // child execs or exits, so `ctx` (and the stack) stay valid and are
                    // used by the child alone meanwhile.
                    let pid = unsafe {
                        let top = self
                            .stack
                            .as_mut_ptr()
                            .add(self.stack.len())
                            .cast::<libc::c_void>();
                        libc::clone(child_main, top, flags, (&mut ctx as *mut ChildCtx).cast())
                    };
                    if pid < 0 {
                        return Err(format!("clone: {}", io::Error::last_os_error()));
                    }
                    if !ctx.failed_step.is_empty() {
                        reap(pid)?;
                        return Err(format!(
                            "{} in the child: {}",
                            ctx.failed_step,
                            io::Error::from_raw_os_error(ctx.errno)
                        ));
                    }
                    pid
                }
            };
            // The parent's copy of the child's end: closed now, as the runner does.
            let host = channel.map(|(host, _child)| host);
            match reap(pid)? {
                0 => host.as_ref().map_or(Ok(()), check_answer),
                127 => Err("child failed before or at exec (exit status 127)".into()),
                status => Err(format!("child exited with wait status {status:#x}")),
            }
        }
    }

    /// Waits for our child `pid`; returns its exit code (or the raw wait status if it
    /// did not exit normally).
    fn reap(pid: libc::pid_t) -> Result<i32, String> {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child into a local.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(format!("waitpid: {e}"));
            }
        }
        Ok(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            status
        })
    }

    /// CPUs this process may run on.
    fn allowed_cpus() -> Vec<usize> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t of the size given.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        assert_eq!(rc, 0, "sched_getaffinity: {}", io::Error::last_os_error());
        // SAFETY: CPU_ISSET reads within the set for every index below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }

    /// Pins the calling thread to `cpu`.
    fn pin_to(cpu: usize) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; CPU_SET stays within it (cpu < CPU_SETSIZE).
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Busy CPU ticks of the whole machine (user + nice + system + irq + softirq),
    /// from the `cpu` line of /proc/stat.
    fn busy_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
        let line = stat.lines().next().expect("/proc/stat is empty");
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().expect("/proc/stat field"))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        v[0] + v[1] + v[2] + v[5] + v[6]
    }

    fn clock_ticks_per_sec() -> f64 {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        assert!(hz > 0, "sysconf(_SC_CLK_TCK)");
        hz as f64
    }

    struct Run {
        wall: Duration,
        spawns: usize,
        /// Per-spawn wall times (ns) of every thread.
        latencies: Vec<u32>,
        cpu_secs: f64,
    }

    impl Run {
        fn per_sec(&self) -> f64 {
            self.spawns as f64 / self.wall.as_secs_f64()
        }
        fn mean_us(&self) -> f64 {
            self.wall.as_secs_f64() * 1e6 / self.spawns as f64
        }
        fn cpu_us_per_spawn(&self) -> f64 {
            self.cpu_secs * 1e6 / self.spawns as f64
        }
        fn percentile_us(&mut self, p: f64) -> f64 {
            self.latencies.sort_unstable();
            let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
            f64::from(self.latencies[i]) / 1e3
        }
    }

    /// `spawns` spawns in each of one thread per entry of `cpus`, each pinned to its
    /// CPU, all released together.
    fn run(kind: Kind, exe: Exe, cpus: &[usize], spawns: usize) -> Result<Run, String> {
        // `ready`: every thread pinned and warmed up; `go`: measurement starts.
        let ready = Arc::new(Barrier::new(cpus.len() + 1));
        let go = Arc::new(Barrier::new(cpus.len() + 1));
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let (ready, go) = (Arc::clone(&ready), Arc::clone(&go));
                std::thread::spawn(move || -> Result<Vec<u32>, String> {
                    let pinned =
                        pin_to(cpu).map_err(|e| format!("sched_setaffinity(cpu {cpu}): {e}"));
                    let mut spawner = Spawner::new(kind, exe);
                    let mut latencies = Vec::with_capacity(spawns);
                    // Warm up before the barriers; a failure is reported after them, so
                    // that they always complete.
                    let warm = pinned.and_then(|()| (0..WARM_UP).try_for_each(|_| spawner.spawn()));
                    ready.wait();
                    go.wait();
                    warm?;
                    for _ in 0..spawns {
                        let t = Instant::now();
                        spawner.spawn()?;
                        latencies.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        ready.wait();
        // Let the warm-up's deferred kernel work finish before the first reading.
        std::thread::sleep(Duration::from_millis(100));
        let ticks_before = busy_ticks();
        go.wait();
        let t = Instant::now();
        let results: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("spawning thread panicked"))
            .collect();
        let wall = t.elapsed();
        // Let deferred kernel work (kworkers tearing namespaces down) finish, so that
        // /proc/stat counts it.
        std::thread::sleep(Duration::from_millis(200));
        let cpu_secs = (busy_ticks() - ticks_before) as f64 / clock_ticks_per_sec();
        let mut latencies = Vec::with_capacity(spawns * cpus.len());
        for r in results {
            latencies.extend(r?);
        }
        Ok(Run {
            wall,
            spawns: spawns * cpus.len(),
            latencies,
            cpu_secs,
        })
    }

    fn usage() -> ! {
        let names: Vec<_> = RECIPES.iter().map(|r| r.name).collect();
        eprintln!(
            "usage: cargo run --release --example spawn_floor [-- --spawns N] [--recipe {}] [--binary UDF]",
            names.join("|")
        );
        std::process::exit(2)
    }

    pub fn main() {
        let mut spawns = 4000usize;
        let mut only: Option<String> = None;
        let mut binary: Option<String> = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .unwrap_or_else(|| usage())
            };
            match key.as_str() {
                "--spawns" => {
                    spawns = value()
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| usage())
                }
                "--recipe" => only = Some(value()),
                "--binary" => binary = Some(value()),
                _ => usage(),
            }
        }
        let recipes: Vec<Recipe> = match &only {
            Some(name) => match RECIPES.iter().find(|r| r.name == name.as_str()) {
                Some(r) => vec![*r],
                None => usage(),
            },
            None => RECIPES.to_vec(),
        };

        let (exe, child_desc) = match &binary {
            Some(path) => {
                let exe = binary_memfd(path).unwrap_or_else(|e| {
                    eprintln!("{path}: {e}");
                    std::process::exit(1)
                });
                (Exe { fd: exe, udf: true }, format!("the UDF {path} from a memfd (execveat), answering an empty request on fd 3"))
            }
            None => {
                let exe = tiny_elf_memfd().unwrap_or_else(|e| {
                    eprintln!("memfd_create/write: {e}");
                    std::process::exit(1)
                });
                (Exe { fd: exe, udf: false }, format!("{}-byte static ELF from a memfd (execveat), exits 0", tiny_elf().len()))
            }
        };
        let cpus = allowed_cpus();
        let k = cpus.len();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "spawn floor: child = {child_desc}; {spawns} spawns per thread; allowed CPUs {cpus:?}; loadavg {}",
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        println!();
        println!(
            "{:<38} | {:^39} | {:^34}",
            "",
            format!("1 thread, pinned to CPU {}", cpus[0]),
            format!("{k} threads, one pinned per CPU")
        );
        println!(
            "{:<38} | {:>8} {:>6} {:>6} {:>8} {:>7} | {:>9} {:>11} {:>12}",
            "recipe",
            "µs/spawn",
            "p50",
            "p99",
            "spawns/s",
            "CPU µs",
            "spawns/s",
            "per CPU/s",
            "CPU µs/spawn"
        );
        println!("{}", "-".repeat(38 + 3 + 39 + 3 + 34));
        for (i, recipe) in recipes.iter().enumerate() {
            let label = format!(
                "{}. {}",
                RECIPES
                    .iter()
                    .position(|r| r.name == recipe.name)
                    .unwrap_or(i)
                    + 1,
                recipe.label
            );
            // Probe first: a recipe the kernel refuses (e.g. user namespaces disabled)
            // is reported as unavailable, and the others still run.
            if let Err(e) = Spawner::new(recipe.kind, exe).spawn() {
                println!("{label:<38} | unavailable: {e}");
                continue;
            }
            let seq = run(recipe.kind, exe, &cpus[..1], spawns);
            let all = run(recipe.kind, exe, &cpus, spawns);
            match (seq, all) {
                (Ok(mut seq), Ok(all)) => println!(
                    "{label:<38} | {:>8.1} {:>6.0} {:>6.0} {:>8.0} {:>7.0} | {:>9.0} {:>11.0} {:>12.0}",
                    seq.mean_us(),
                    seq.percentile_us(0.50),
                    seq.percentile_us(0.99),
                    seq.per_sec(),
                    seq.cpu_us_per_spawn(),
                    all.per_sec(),
                    all.per_sec() / k as f64,
                    all.cpu_us_per_spawn(),
                ),
                (Err(e), _) | (_, Err(e)) => println!("{label:<38} | failed: {e}"),
            }
        }
        println!();
        println!(
            "µs/spawn, p50, p99: wall time per spawn+exec+exit+reap; CPU µs: system-wide busy CPU per spawn \
             from /proc/stat (incl. deferred kworker work and any other load)."
        );
        println!(
            "Compare the last recipe's {k}-thread spawns/s with `roma-byob demo --mode minimal --binary <no-libc UDF> \
             --executions 20000` executions/s: the engine's ceiling is this floor minus its request round trips."
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    floor::main();
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("spawn_floor: x86_64 only (the child is a hand-built x86_64 ELF).");
}
