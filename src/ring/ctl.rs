//! The shard's side of its runner connection: an ordered queue of control messages
//! sent with io_uring `SENDMSG`, several messages (and their fds) per call.

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


    /// The next SENDMSG to submit, if none is in flight and something is queued.
    pub(super) fn next_sqe(&mut self, fd: RawFd, user_data: u64) -> Option<squeue::Entry> {
        if self.inflight.is_some() || self.queue.is_empty() {
            return None;
        }
        let mut bytes = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        while let Some(m) = self.queue.front() {
            let fits = fds.len() + m.fds.len() <= BATCH_FDS && bytes.len() + m.bytes.len() <= BATCH_BYTES;
            if !fits && !bytes.is_empty() {
                break;
            }
            let m = self.queue.pop_front()?;
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
        let sqe = opcode::SendMsg::new(types::Fd(fd), &b.hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data);
        self.inflight = Some(batch);
        Some(sqe)
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
        // Short send: the fds went with the first byte; send the rest without them.
        let b = &mut **batch;
        b.iov = libc::iovec {
            iov_base: b.bytes[b.sent..].as_mut_ptr().cast(),
            iov_len: b.bytes.len() - b.sent,
        };
        b.hdr.msg_control = std::ptr::null_mut();
        b.hdr.msg_controllen = 0;
        let sqe = opcode::SendMsg::new(types::Fd(fd), &b.hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data);
        Ok(Some(sqe))
    }
}
