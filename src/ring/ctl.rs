//! The shard's side of its runner connection: an ordered queue of control messages,
//! several messages (and their fds) per call. A batch is first sent at once with a
//! non-blocking `sendmsg`; only what the socket does not take then goes through
//! io_uring `SENDMSG`. (Sent through the ring, a batch the socket takes at once
//! still completes inside the next `io_uring_enter`, which then returns at once
//! instead of sleeping: one more loop round per batch, about one per execution.)

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types};

use crate::ipc::control::{host_to_runner, HostToRunner};
use crate::ipc::{fdpass, frame};

/// Most fds in one batch; the runner accepts up to `fdpass::MAX_FDS` per `recvmsg`.
const BATCH_FDS: usize = 24;
const BATCH_BYTES: usize = 64 * 1024;

struct OutMsg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

struct Batch {
    hdr: libc::msghdr,
    iov: libc::iovec,
    cmsg: [u64; 48],
    bytes: Vec<u8>,
    sent: usize,
    /// Kept open until the kernel has taken its references.
    _fds: Vec<OwnedFd>,
}

// SAFETY: the raw pointers in `hdr`/`iov` point into the same boxed Batch, which only
// the shard thread touches.
unsafe impl Send for Batch {}

impl Batch {
    /// After a short send: the fds went with the first byte; what is left of the
    /// bytes goes without them.
    fn rest_without_fds(&mut self) {
        self.iov = libc::iovec { iov_base: self.bytes[self.sent..].as_mut_ptr().cast(), iov_len: self.bytes.len() - self.sent };
        self.hdr.msg_control = std::ptr::null_mut();
        self.hdr.msg_controllen = 0;
    }
}

/// Outbound control messages of one shard.
#[derive(Default)]
pub(super) struct CtlOut {
    queue: VecDeque<OutMsg>,
    inflight: Option<Box<Batch>>,
    /// fds of completed batches, for the reactor to close through the ring.
    sent_fds: Vec<OwnedFd>,
}

impl CtlOut {
    pub(super) fn take_sent_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.sent_fds)
    }

    pub(super) fn push(&mut self, msg: host_to_runner::Msg, fds: Vec<OwnedFd>) {
        let bytes = frame::encode(&HostToRunner { msg: Some(msg) });
        self.queue.push_back(OutMsg { bytes, fds });
    }


    /// Sends what is queued, unless a batch is in flight: each batch first with a
    /// non-blocking `sendmsg`, until one is not taken whole. Returns the SENDMSG to
    /// submit for the rest of that batch, if any (then in flight). The fds of the
    /// batches sent are in `take_sent_fds`.
    pub(super) fn next_sqe(&mut self, fd: RawFd, user_data: u64) -> Option<squeue::Entry> {
        while self.inflight.is_none() && !self.queue.is_empty() {
            self.start_batch();
            let batch = self.inflight.as_mut()?;
            // SAFETY: `hdr` points at this batch's iovec, bytes and cmsg buffer, all
            // alive and unmoved for the call.
            let n = unsafe { libc::sendmsg(fd, &batch.hdr, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                // Would block, or failed: the ring retries and reports the error.
                break;
            }
            batch.sent = n as usize;
            if batch.sent < batch.bytes.len() {
                batch.rest_without_fds();
                break;
            }
            if let Some(done) = self.inflight.take() {
                self.sent_fds.extend(done._fds);
            }
        }
        let batch = self.inflight.as_ref()?;
        Some(opcode::SendMsg::new(types::Fd(fd), &batch.hdr).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data))
    }

    /// Makes the next batch of queued messages the one in flight.
    fn start_batch(&mut self) {
        // How many queued messages go (at least one), so that the batch's buffers
        // are allocated once, at their size.
        let (mut count, mut len, mut nfds) = (0, 0, 0);
        for m in &self.queue {
            let fits = nfds + m.fds.len() <= BATCH_FDS && len + m.bytes.len() <= BATCH_BYTES;
            if !fits && count > 0 {
                break;
            }
            count += 1;
            len += m.bytes.len();
            nfds += m.fds.len();
        }
        let mut bytes = Vec::with_capacity(len);
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(nfds);
        for m in self.queue.drain(..count) {
            bytes.extend_from_slice(&m.bytes);
            fds.extend(m.fds);
        }
        // SAFETY: a zeroed msghdr/iovec is a valid empty value; fields set below.
        let mut batch = Box::new(Batch {
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
            cmsg: [0; 48],
            bytes,
            sent: 0,
            _fds: fds,
        });
        let raw: Vec<RawFd> = batch._fds.iter().map(|f| f.as_raw_fd()).collect();
        let b = &mut *batch;
        b.iov = libc::iovec { iov_base: b.bytes.as_mut_ptr().cast(), iov_len: b.bytes.len() };
        b.hdr.msg_iov = &mut b.iov;
        b.hdr.msg_iovlen = 1;
        fdpass::attach_fds(&mut b.hdr, &mut b.cmsg, &raw);
        self.inflight = Some(batch);
    }

    /// Handles the SENDMSG completion. Returns the SQE to resubmit after a short
    /// send, or an error when the connection is broken.
    pub(super) fn on_complete(&mut self, res: i32, fd: RawFd, user_data: u64) -> Result<Option<squeue::Entry>, String> {
        let Some(batch) = self.inflight.as_mut() else {
            return Ok(None);
        };
        if res < 0 {
            if -res == libc::EINTR || -res == libc::EAGAIN {
                let sqe = opcode::SendMsg::new(types::Fd(fd), &batch.hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .user_data(user_data);
                return Ok(Some(sqe));
            }
            return Err(std::io::Error::from_raw_os_error(-res).to_string());
        }
        batch.sent += res as usize;
        if batch.sent >= batch.bytes.len() {
            if let Some(done) = self.inflight.take() {
                self.sent_fds.extend(done._fds);
            }
            return Ok(None);
        }
        batch.rest_without_fds();
        let sqe = opcode::SendMsg::new(types::Fd(fd), &batch.hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data);
        Ok(Some(sqe))
    }
}
