//! The calling thread reads a handed-over execution's response itself.
//!
//! A caller that handed its request to a worker (see [`super::ready`]) and then
//! blocks in `Execution::wait` can read the answer from the worker's socket
//! without the engine thread: the worker's write wakes the caller directly, one
//! thread hop less than a response the engine thread reads and passes on. It only
//! applies where a response is nothing but one length-delimited frame on the
//! socket: code tokens without host calls, log capture or shared memory (see
//! `TokenEntry::direct`), on a worker that became ready while its shard had
//! nothing in flight: the shard posted no receive on it (`Offer::armed`), and
//! posts one only when it reads the response itself.
//!
//! Who completes the execution is decided by one atomic ([`Handoff`]):
//! - `May`: nobody reads yet. `wait` turns it into `Caller`; polling the future,
//!   dropping the execution, or the shard (the worker exited, the deadline passed,
//!   cancel, delete) turn it into `Engine`.
//! - `Caller`: the caller peeks at the socket. Only when a whole frame is there
//!   does it turn `Caller` into `Done` and keep it; in every other case (end of
//!   file, a partial or malformed frame, bytes after it, its wait ran out) it turns
//!   it into `Engine` and tells the shard, which reads the socket from the start:
//!   the caller consumes nothing, so nothing is lost. The shard may also take a
//!   `Caller` execution (deadline, cancel, delete): it shuts the socket down so the
//!   caller wakes, and the caller then finds `Engine` and takes the shard's answer.
//! - `Engine` and `Done` are final: exactly one side answers.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::ipc::frame::{self, Header};

const MAY: u8 = 0;
const CALLER: u8 = 1;
const ENGINE: u8 = 2;
const DONE: u8 = 3;

/// Who answers a handed-over execution (module docs).
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    state: AtomicU8,
}

/// What the shard found when it took an execution over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Nobody was reading: the response, if any, is unread in the socket.
    Unread,
    /// The caller was reading: it must be woken (it then takes the shard's answer).
    FromCaller,
    /// The shard owned it already.
    Already,
    /// The caller has the response: the shard must not answer.
    CallerDone,
}

impl Handoff {
    /// The caller starts reading (`May` → `Caller`).
    pub fn caller_claims(&self) -> bool {
        self.state.compare_exchange(MAY, CALLER, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller has a whole frame and keeps it (`Caller` → `Done`); false if the
    /// shard took the execution first.
    pub fn caller_finishes(&self) -> bool {
        self.state.compare_exchange(CALLER, DONE, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller leaves the answer to the shard (`May` or `Caller` → `Engine`):
    /// true if it did, and must tell the shard; false if the shard owns it already.
    pub fn give_back(&self) -> bool {
        let mut cur = self.state.load(Ordering::Acquire);
        while cur == MAY || cur == CALLER {
            match self.state.compare_exchange(cur, ENGINE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// The shard takes the execution over (unless the caller finished it).
    pub fn engine_takes(&self) -> Taken {
        self.take(false)
    }

    /// As [`Handoff::engine_takes`], but a caller that is reading keeps it
    /// (`FromCaller` then means: left to the caller).
    pub fn engine_takes_unless_reading(&self) -> Taken {
        self.take(true)
    }

    fn take(&self, keep_reader: bool) -> Taken {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let taken = match cur {
                MAY => Taken::Unread,
                CALLER if keep_reader => return Taken::FromCaller,
                CALLER => Taken::FromCaller,
                ENGINE => return Taken::Already,
                _ => return Taken::CallerDone,
            };
            match self.state.compare_exchange(cur, ENGINE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return taken,
                Err(now) => cur = now,
            }
        }
    }

    /// The caller finished the execution.
    pub fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }
}

/// What a look at a worker's socket found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// One whole response frame and nothing after it: its body.
    Frame(Vec<u8>),
    /// Nothing yet.
    Empty,
    /// The start of a frame the caller may take once the rest has arrived (many
    /// UDFs write the length prefix and the body in two writes).
    Partial,
    /// Anything else (a frame too large to peek, bytes after it, a malformed
    /// header, end of file, an error): the shard reads and judges it.
    Other,
}

/// Largest response frame the caller takes from the socket; larger ones are read
/// by the shard (they may not fit the socket's buffer at once anyway).
pub(crate) const MAX_DIRECT_FRAME: usize = 64 << 10;
/// Peeked at first; a larger frame is peeked again at its full size.
const FIRST_PEEK: usize = 4096;

/// Looks at the bytes waiting on `fd` without consuming any (`MSG_PEEK`): returns
/// the body if they are exactly one complete frame of at most `max` bytes.
pub(crate) fn peek_frame(fd: &OwnedFd, max: usize) -> Peeked {
    let mut first = [0u8; FIRST_PEEK];
    let n = match peek(fd, &mut first) {
        PeekResult::Bytes(n) => n,
        PeekResult::Empty => return Peeked::Empty,
        PeekResult::Closed => return Peeked::Other,
    };
    let (offset, len) = match frame::parse_header(&first[..n]) {
        Header::Complete { offset, len } if len <= max as u64 => (offset, len as usize),
        Header::Incomplete => return Peeked::Partial,
        _ => return Peeked::Other,
    };
    let total = offset + len;
    if total > MAX_DIRECT_FRAME {
        return Peeked::Other;
    }
    if total <= FIRST_PEEK {
        // Exactly the frame; more is garbage after it.
        return match n.cmp(&total) {
            std::cmp::Ordering::Equal => Peeked::Frame(first[offset..total].to_vec()),
            std::cmp::Ordering::Less => Peeked::Partial,
            std::cmp::Ordering::Greater => Peeked::Other,
        };
    }
    if n < FIRST_PEEK {
        return Peeked::Partial;
    }
    // One byte more than the frame, to see anything after it.
    let mut all = vec![0u8; total + 1];
    match peek(fd, &mut all) {
        PeekResult::Bytes(m) if m == total => {
            all.truncate(total);
            all.drain(..offset);
            Peeked::Frame(all)
        }
        PeekResult::Bytes(m) if m < total => Peeked::Partial,
        _ => Peeked::Other,
    }
}

enum PeekResult {
    Bytes(usize),
    Empty,
    Closed,
}

fn peek(fd: &OwnedFd, buf: &mut [u8]) -> PeekResult {
    loop {
        // SAFETY: receiving into a live, writable buffer of buf.len() bytes on a
        // socket we hold open; MSG_PEEK leaves the data queued.
        let n = unsafe {
            libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if n > 0 {
            return PeekResult::Bytes(n as usize);
        }
        if n == 0 {
            return PeekResult::Closed;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return PeekResult::Empty,
            _ => return PeekResult::Closed,
        }
    }
}

/// Blocks until `fd` is readable or closed, or `timeout` passes (false).
pub(crate) fn wait_readable(fd: &OwnedFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    ready_within(timeout, |ms| unsafe { libc::poll(&mut pfd, 1, ms) })
}

/// Runs `wait` (`poll` or `epoll_wait`: a count of ready descriptors, or -1) with
/// `timeout` in ms, again after EINTR: true if something is ready, or on an error
/// (the caller then looks, and gives the execution back if it finds nothing).
fn ready_within(timeout: std::time::Duration, mut wait: impl FnMut(i32) -> i32) -> bool {
    let ms = i32::try_from(timeout.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
    loop {
        let r = wait(ms);
        if r >= 0 {
            return r > 0;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return true;
        }
    }
}

/// Waits for more bytes on a socket that already has some: `poll` reports such a
/// socket readable at once (Unix sockets ignore `SO_RCVLOWAT` there), so an
/// edge-triggered epoll registration, which reports each arrival once, is used.
/// The epoll instance lives as long as this (no descriptor outlives the wait).
pub(crate) struct Arrivals {
    epoll: OwnedFd,
    /// Kept open while registered.
    _fd: std::sync::Arc<OwnedFd>,
}

impl Arrivals {
    pub fn watch(fd: std::sync::Arc<OwnedFd>) -> std::io::Result<Self> {
        // SAFETY: epoll_create1 takes only flags and returns a fresh fd or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let epoll = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32, u64: 0 };
        // SAFETY: registering an open fd with our epoll instance; `ev` is a valid
        // event. The registration goes with the epoll fd when it closes.
        if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arrivals { epoll, _fd: fd })
    }

    /// Blocks until bytes arrive (or the socket closes) after the previous call, or
    /// `timeout` passes (false). The first call returns at once: registering a
    /// readable socket counts as an arrival.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event in `ev`, on our epoll instance.
        ready_within(timeout, |ms| unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, ms) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fresh fds into `fds`.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: both fds are fresh and owned here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: sending from a live slice on an open socket.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        prost::encoding::encode_varint(body.len() as u64, &mut f);
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn exactly_one_side_answers() {
        let h = Handoff::default();
        assert!(h.caller_claims());
        assert!(!h.caller_claims());
        assert_eq!(h.engine_takes(), Taken::FromCaller);
        assert!(!h.caller_finishes());
        assert!(!h.give_back());
        assert_eq!(h.engine_takes(), Taken::Already);

        let h = Handoff::default();
        assert_eq!(h.engine_takes(), Taken::Unread);
        assert!(!h.caller_claims());

        let h = Handoff::default();
        assert!(h.caller_claims());
        assert!(h.caller_finishes());
        assert!(h.is_done());
        assert_eq!(h.engine_takes(), Taken::CallerDone);
        assert!(!h.give_back());

        let h = Handoff::default();
        assert!(h.caller_claims());
        assert_eq!(h.engine_takes_unless_reading(), Taken::FromCaller);
        assert!(h.caller_finishes());
        assert_eq!(h.engine_takes_unless_reading(), Taken::CallerDone);
        let h = Handoff::default();
        assert_eq!(h.engine_takes_unless_reading(), Taken::Unread);
        assert!(!h.caller_claims());

        let h = Handoff::default();
        assert!(h.give_back());
        assert_eq!(h.engine_takes(), Taken::Already);
    }

    #[test]
    fn only_a_whole_frame_with_nothing_after_it_is_taken() {
        let (host, worker) = pair();
        let host = std::sync::Arc::new(host);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Empty);
        // Part of a frame: nothing consumed; the rest is waited for.
        let f = framed(b"hello");
        send(&worker, &f[..3]);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Partial);
        let arrivals = Arrivals::watch(host.clone()).unwrap();
        assert!(arrivals.wait(std::time::Duration::from_secs(5)), "registering a readable socket is an arrival");
        assert!(!arrivals.wait(std::time::Duration::from_millis(20)), "no new bytes");
        send(&worker, &f[3..]);
        assert!(arrivals.wait(std::time::Duration::from_secs(5)));
        drop(arrivals);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Frame(b"hello".to_vec()));
        // Still there (peeked, not consumed): a second look sees the same.
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Frame(b"hello".to_vec()));
        // Over the response limit: the shard reports it.
        assert_eq!(peek_frame(&host, 4), Peeked::Other);
        // Garbage after the frame.
        send(&worker, b"x");
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Other);

        // A frame larger than the first peek, whole and in part.
        let (host, worker) = pair();
        let big = vec![7u8; 10_000];
        let f = framed(&big);
        send(&worker, &f[..6000]);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Partial);
        send(&worker, &f[6000..]);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Frame(big.clone()));
        send(&worker, b"y");
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Other);

        // End of file with nothing: the shard judges it.
        let (host, worker) = pair();
        drop(worker);
        assert!(wait_readable(&host, std::time::Duration::from_secs(5)));
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Other);

        // A split length prefix.
        let (host, worker) = pair();
        send(&worker, &[0x80]);
        assert_eq!(peek_frame(&host, 1 << 20), Peeked::Partial);

        // A frame too large for the caller (the shard reads it in pieces).
        let (host, worker) = pair();
        let mut header = Vec::new();
        prost::encoding::encode_varint((MAX_DIRECT_FRAME + 1) as u64, &mut header);
        send(&worker, &header);
        assert_eq!(peek_frame(&host, 1 << 30), Peeked::Other);
    }

    #[test]
    fn waiting_for_a_readable_socket_times_out() {
        let (host, _worker) = pair();
        assert!(!wait_readable(&host, std::time::Duration::from_millis(20)));
    }
}
