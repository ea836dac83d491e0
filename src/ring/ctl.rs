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

struct Batch {
    hdr: libc::msghdr,
    iov: libc::iovec,
    cmsg: [u64; 48],
    bytes: Vec<u8>,
    sent: usize,
    /// Kept open until the kernel has taken its references.
    fds: Vec<OwnedFd>,
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

/// Outbound control messages of one shard. Its buffers are kept and reused: a
/// message costs no allocation of its own once they have grown (a spawn order per
/// execution went through three before: its frame, the batch's bytes and the
/// batch; `examples/engine_allocs.rs` counts them).
#[derive(Default)]
pub(super) struct CtlOut {
    /// Queued messages' frames, back to back.
    queued: Vec<u8>,
    /// Per queued message, in order: its frame's length and how many of
    /// `queued_fds` go with it.
    bounds: VecDeque<(usize, usize)>,
    queued_fds: VecDeque<OwnedFd>,
    /// The batch being sent, if any.
    inflight: Option<Box<Batch>>,
    /// The last batch sent, kept for its buffers.
    spare: Option<Box<Batch>>,
    /// The raw numbers of a batch's fds, for its control message.
    raw: Vec<RawFd>,
    /// fds of completed batches, for the reactor to close through the ring.
    sent_fds: Vec<OwnedFd>,
}

impl CtlOut {
    /// The next fd of a completed batch, for the reactor to close.
    pub(super) fn pop_sent_fd(&mut self) -> Option<OwnedFd> {
        self.sent_fds.pop()
    }

    pub(super) fn push(&mut self, msg: host_to_runner::Msg, fds: Vec<OwnedFd>) {
        let before = self.queued.len();
        frame::encode_into(&HostToRunner { msg: Some(msg) }, &mut self.queued);
        self.bounds.push_back((self.queued.len() - before, fds.len()));
        self.queued_fds.extend(fds);
    }

    /// Sends what is queued, unless a batch is in flight: each batch first with a
    /// non-blocking `sendmsg`, until one is not taken whole. Returns the SENDMSG to
    /// submit for the rest of that batch, if any (then in flight). The fds of the
    /// batches sent are in `pop_sent_fd`.
    pub(super) fn next_sqe(&mut self, fd: RawFd, user_data: u64) -> Option<squeue::Entry> {
        while self.inflight.is_none() && !self.bounds.is_empty() {
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
            self.finish_batch();
        }
        let batch = self.inflight.as_ref()?;
        Some(opcode::SendMsg::new(types::Fd(fd), &batch.hdr).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data))
    }

    /// The batch in flight was sent whole: its fds may be closed, its buffers
    /// serve the next batch.
    fn finish_batch(&mut self) {
        if let Some(mut done) = self.inflight.take() {
            self.sent_fds.append(&mut done.fds);
            self.spare = Some(done);
        }
    }

    /// Makes the next batch of queued messages the one in flight.
    fn start_batch(&mut self) {
        // How many queued messages go (at least one).
        let (mut count, mut len, mut nfds) = (0, 0, 0);
        for &(bytes, fds) in &self.bounds {
            let fits = nfds + fds <= BATCH_FDS && len + bytes <= BATCH_BYTES;
            if !fits && count > 0 {
                break;
            }
            count += 1;
            len += bytes;
            nfds += fds;
        }
        let mut batch = self.spare.take().unwrap_or_else(|| {
            Box::new(Batch {
                // SAFETY: a zeroed msghdr is a valid empty value; set below.
                hdr: unsafe { std::mem::zeroed() },
                iov: libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
                cmsg: [0; 48],
                bytes: Vec::new(),
                sent: 0,
                fds: Vec::new(),
            })
        });
        batch.bytes.clear();
        if count == self.bounds.len() {
            // Everything queued goes: the buffers trade places, no copy.
            std::mem::swap(&mut batch.bytes, &mut self.queued);
            self.bounds.clear();
        } else {
            batch.bytes.extend_from_slice(&self.queued[..len]);
            self.queued.drain(..len);
            self.bounds.drain(..count);
        }
        batch.fds.clear();
        batch.fds.extend(self.queued_fds.drain(..nfds));
        batch.sent = 0;
        self.raw.clear();
        self.raw.extend(batch.fds.iter().map(|f| f.as_raw_fd()));
        let b = &mut *batch;
        // SAFETY: a zeroed msghdr is a valid empty value; set below.
        b.hdr = unsafe { std::mem::zeroed() };
        b.iov = libc::iovec { iov_base: b.bytes.as_mut_ptr().cast(), iov_len: b.bytes.len() };
        b.hdr.msg_iov = &mut b.iov;
        b.hdr.msg_iovlen = 1;
        fdpass::attach_fds(&mut b.hdr, &mut b.cmsg, &self.raw);
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
            self.finish_batch();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::control::Kill;
    use prost::Message;

    /// Whatever bytes the peer has now, with their fds.
    fn received(peer: &OwnedFd, fds: &mut Vec<OwnedFd>) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match fdpass::recv_with_fds_flags(peer.as_raw_fd(), &mut buf, fds, libc::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        bytes
    }

    /// The worker ids of the `Kill` frames in `bytes`, in order (all whole frames).
    fn kill_ids(mut bytes: &[u8]) -> Vec<u64> {
        let mut ids = Vec::new();
        while !bytes.is_empty() {
            match HostToRunner::decode_length_delimited(&mut bytes).expect("a whole frame").msg {
                Some(host_to_runner::Msg::Kill(k)) => ids.push(k.worker_id),
                other => panic!("unexpected message {other:?}"),
            }
        }
        ids
    }

    /// Reads everything the peer has (it must all be there): the `Kill` ids.
    fn drain(peer: &OwnedFd, fds: &mut Vec<OwnedFd>) -> Vec<u64> {
        kill_ids(&received(peer, fds))
    }

    fn kill(id: u64) -> host_to_runner::Msg {
        host_to_runner::Msg::Kill(Kill { worker_id: id })
    }

    #[test]
    fn messages_go_in_order_and_buffers_are_reused() {
        let (ours, peer) = fdpass::stream_pair().unwrap();
        let mut out = CtlOut::default();
        for id in 1..=3 {
            out.push(kill(id), Vec::new());
        }
        assert!(out.next_sqe(ours.as_raw_fd(), 7).is_none(), "a socket with room takes the batch at once");
        let mut fds = Vec::new();
        assert_eq!(drain(&peer, &mut fds), vec![1, 2, 3]);
        // The next batch reuses the first one's buffers: same box.
        let first = out.spare.as_deref().map(|b| b as *const Batch).expect("the sent batch is kept");
        for id in 4..=5 {
            out.push(kill(id), Vec::new());
        }
        assert!(out.next_sqe(ours.as_raw_fd(), 7).is_none());
        assert_eq!(out.spare.as_deref().map(|b| b as *const Batch), Some(first));
        assert_eq!(drain(&peer, &mut fds), vec![4, 5]);
        assert!(fds.is_empty());
        assert!(out.pop_sent_fd().is_none());
    }

    #[test]
    fn fds_travel_with_their_messages_across_batches() {
        let (ours, peer) = fdpass::stream_pair().unwrap();
        let mut out = CtlOut::default();
        // More fds than one batch carries: two batches.
        let n = BATCH_FDS as u64 + 6;
        for id in 0..n {
            let (a, _b) = fdpass::stream_pair().unwrap();
            out.push(kill(id), vec![a]);
        }
        assert!(out.next_sqe(ours.as_raw_fd(), 7).is_none());
        let mut fds = Vec::new();
        assert_eq!(drain(&peer, &mut fds), (0..n).collect::<Vec<_>>());
        assert_eq!(fds.len(), n as usize, "every fd arrived");
        // Ours, to close once the kernel has its references.
        let mut sent = 0;
        while out.pop_sent_fd().is_some() {
            sent += 1;
        }
        assert_eq!(sent, n as usize);
    }

    #[test]
    fn a_full_socket_leaves_the_rest_to_the_ring() {
        let (ours, peer) = fdpass::stream_pair().unwrap();
        let mut out = CtlOut::default();
        // More than a stream socket's buffer: the first batch is taken in part.
        let ids: Vec<u64> = (0..120_000).collect();
        for &id in &ids {
            out.push(kill(id), Vec::new());
        }
        let sqe = out.next_sqe(ours.as_raw_fd(), 7);
        assert!(sqe.is_some(), "a short send leaves a SENDMSG for the ring");
        // Play the ring: send the rest by hand as the SENDMSG would, draining the
        // peer in between.
        let mut fds = Vec::new();
        let mut got = Vec::new();
        while out.inflight.is_some() {
            got.extend(received(&peer, &mut fds));
            let batch = out.inflight.as_ref().unwrap();
            // SAFETY: the batch's header points at its live buffers.
            let n = unsafe { libc::sendmsg(ours.as_raw_fd(), &batch.hdr, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            let res = if n < 0 { -std::io::Error::last_os_error().raw_os_error().unwrap() } else { n as i32 };
            if out.on_complete(res, ours.as_raw_fd(), 7).unwrap().is_none() && out.inflight.is_none() {
                // This batch is done; the next goes as `next_sqe` sends it.
                let _ = out.next_sqe(ours.as_raw_fd(), 7);
            }
        }
        got.extend(received(&peer, &mut fds));
        assert_eq!(kill_ids(&got), ids);
        assert!(fds.is_empty());
    }
}
