//! Blocking SCM_RIGHTS send/receive on Unix stream sockets (runner side and engine
//! start-up; the host's hot path sends through io_uring instead). `sendmsg` and
//! `recvmsg` carry the seccomp gate's key (`crate::sandbox::gate`): the runner's
//! connection threads may use them, workers may not.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sandbox::gate;

/// Most fds accepted in one `recvmsg`.
pub const MAX_FDS: usize = 32;

/// Space for the control message carrying `n` fds.
pub fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Fills `cmsg_buf` with one SCM_RIGHTS control message for `fds` and points `msg` at
/// it. `cmsg_buf` must be at least `cmsg_space(fds.len())` bytes, 8-byte aligned,
/// and outlive every use of `msg`.
pub fn attach_fds(msg: &mut libc::msghdr, cmsg_buf: &mut [u64], fds: &[RawFd]) {
    if fds.is_empty() {
        msg.msg_control = std::ptr::null_mut();
        msg.msg_controllen = 0;
        return;
    }
    let space = cmsg_space(fds.len());
    assert!(cmsg_buf.len() * 8 >= space, "cmsg buffer too small");
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes, so CMSG_FIRSTHDR
    // returns a valid header pointer and CMSG_DATA has room for `fds`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of_val(fds),
        );
    }
}

/// Sends all of `data` with `fds` attached to the first byte (blocking).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    let mut cmsg_buf = [0u64; 40];
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr() as *mut _,
            iov_len: data.len() - sent,
        };
        // SAFETY: zeroed msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 {
            attach_fds(&mut msg, &mut cmsg_buf, fds);
        }
        let args = [sock as usize, &msg as *const libc::msghdr as usize, libc::MSG_NOSIGNAL as usize, 0, 0];
        // SAFETY: msg points at live iovec and cmsg buffers for the call's duration.
        let n = unsafe { gate::syscall(libc::SYS_sendmsg, args) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Receives bytes into `buf`, appending any passed fds to `fds`. Returns the byte
/// count (0 on EOF).
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    recv_with_fds_flags(sock, buf, fds, 0)
}

/// As [`recv_with_fds`], with extra `recvmsg` flags (`MSG_DONTWAIT`).
pub fn recv_with_fds_flags(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>, flags: i32) -> io::Result<usize> {
    let mut cmsg_buf = [0u64; 40];
    debug_assert!(cmsg_buf.len() * 8 >= cmsg_space(MAX_FDS));
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: zeroed msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(MAX_FDS) as _;
        let args = [sock as usize, &mut msg as *mut libc::msghdr as usize, (libc::MSG_CMSG_CLOEXEC | flags) as usize, 0, 0];
        // SAFETY: msg points at live buffers for the call's duration.
        let n = unsafe { gate::syscall(libc::SYS_recvmsg, args) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        take_fds(&msg, fds);
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("control message truncated: too many fds in one message"));
        }
        return Ok(n as usize);
    }
}

/// Blocks until `sock` is readable (or closed, or in error): `ppoll` for POLLIN.
/// Unlike a thread blocked in `recvmsg`, a thread waiting here is not woken each
/// time the peer reads what this socket sent: the socket's wait queue carries
/// both directions' wake-ups, and poll filters them by event.
pub fn wait_readable(sock: RawFd) -> io::Result<()> {
    wait_readable_for(sock, None).map(|_| ())
}

/// As [`wait_readable`], for at most `timeout` (`None`: no limit): false if the
/// time ran out first.
pub fn wait_readable_for(sock: RawFd, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    loop {
        let mut pfd = libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 };
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let args = [&mut pfd as *mut libc::pollfd as usize, 1, ts_ptr as usize, 0, 0];
        // SAFETY: one valid pollfd and (if any) one valid timespec for the call's
        // duration; no sigmask.
        let n = unsafe { gate::syscall(libc::SYS_ppoll, args) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Moves the SCM_RIGHTS fds of a received `msg` into `fds`.
pub fn take_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                let count = bytes / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
}

/// A connected Unix stream socket pair, both ends close-on-exec.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Borrowed raw fd helper.
pub fn raw<T: AsRawFd>(f: &T) -> RawFd {
    f.as_raw_fd()
}
