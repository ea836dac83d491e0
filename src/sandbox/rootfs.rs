//! `minimal` mode: the runner enters fresh user, mount, network, IPC and UTS
//! namespaces and pivots once into a read-only tmpfs root that holds only the
//! library mounts and the zygote shim (`crate::udf_runner::zygote::SHIM_PATH`).
//! Workers share this root, so a worker costs no mount work at all (DESIGN §4: a
//! mount namespace + pivot_root per worker costs more than the rest of the spawn
//! path together).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn mount(src: Option<&Path>, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data_c = data.map(|s| CString::new(s).unwrap_or_default());
    // SAFETY: every pointer is either null or a valid NUL-terminated string that
    // outlives the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    check(rc, &format!("mount {:?} on {}", src, target.display()))
}

/// Mount flags that a user namespace may not clear on a bind of a host mount
/// (they are locked), read back so the read-only remount keeps them.
fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = cstr(path)?;
    // SAFETY: statvfs fills the zeroed struct; c is a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, "statvfs")?;
    let mut flags = 0;
    let map = [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    for (st_flag, ms_flag) in map {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

fn write_file(path: &str, contents: &str) -> io::Result<()> {
    std::fs::write(path, contents).map_err(|e| io::Error::new(e.kind(), format!("write {path}: {e}")))
}

/// Enters the runner's namespaces and read-only root. Must be called while the
/// process is single-threaded. Returns warnings (skipped mounts).
pub fn enter_minimal_root(lib_mounts: &[PathBuf], scratch: &Path) -> io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    // SAFETY: plain syscalls on our own process.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare only changes this (single-threaded) process's namespaces.
    check(unsafe { libc::unshare(flags) }, "unshare(user|mount|net|ipc|uts)")?;
    write_file("/proc/self/setgroups", "deny")?;
    write_file("/proc/self/uid_map", &format!("0 {uid} 1"))?;
    write_file("/proc/self/gid_map", &format!("0 {gid} 1"))?;

    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    // Open every source before the tmpfs covers `scratch`: a source under it (a
    // library directory in /tmp, say) would be hidden afterwards. Bind mounts then
    // use the fds' /proc/self/fd paths.
    let mut sources = Vec::new();
    for lib in lib_mounts {
        match std::fs::canonicalize(lib).and_then(|p| {
            let c = cstr(&p)?;
            // SAFETY: valid path; O_PATH opens without reading.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fresh fd owned by us.
            Ok((lib, p.is_file(), unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
        }) {
            Ok(s) => sources.push(s),
            Err(e) => warnings.push(format!("library mount {} skipped: {e}", lib.display())),
        }
    }
    mount(
        Some(Path::new("tmpfs")),
        scratch,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=64k,nr_inodes=1024,mode=0755"),
    )?;
    for (lib, is_file, source_fd) in &sources {
        let source = PathBuf::from(format!("/proc/self/fd/{}", source_fd.as_raw_fd()));
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let target = scratch.join(rel);
        if *is_file {
            // A single file (an interpreter, say): bind it onto an empty file.
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", parent.display())))?;
            }
            std::fs::File::create(&target)
                .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", target.display())))?;
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", target.display())))?;
        }
        mount(Some(&source), &target, None, libc::MS_BIND | libc::MS_REC, None)?;
        let keep = locked_flags(&target)?;
        mount(
            None,
            &target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | keep,
            None,
        )?;
    }
    // The zygote shim (`crate::udf_runner::zygote`), read-only with the rest.
    let shim = scratch.join(crate::udf_runner::zygote::SHIM_PATH.trim_start_matches('/'));
    std::fs::write(&shim, crate::udf_runner::zygote::SHIM)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", shim.display())))?;
    let old = scratch.join(".old-root");
    std::fs::create_dir(&old).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", old.display())))?;
    let scratch_c = cstr(scratch)?;
    let old_c = cstr(&old)?;
    // SAFETY: both are valid paths; pivot_root swaps this mount namespace's root.
    check(
        unsafe { libc::syscall(libc::SYS_pivot_root, scratch_c.as_ptr(), old_c.as_ptr()) as libc::c_int },
        "pivot_root",
    )?;
    std::env::set_current_dir("/")?;
    let old_in_new = c"/.old-root";
    // SAFETY: valid path; detaches the whole old root tree from this namespace.
    check(unsafe { libc::umount2(old_in_new.as_ptr(), libc::MNT_DETACH) }, "umount old root")?;
    std::fs::remove_dir("/.old-root")?;
    mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV, None)?;
    Ok(warnings)
}
