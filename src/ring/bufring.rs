//! A ring of provided buffers (`IORING_REGISTER_PBUF_RING`) for one multishot
//! receive: the kernel picks a free buffer for each chunk it receives, and the
//! receive stays armed between messages, so the shard neither submits a new
//! receive nor arms a new poll after each one (see `Reactor::post_ctl_recv`).
//!
//! The buffers are the reactor's like every other buffer the kernel writes into:
//! they must stay alive until the receive's last completion (`IORING_CQE_F_MORE`
//! clear) is reaped, which the reactor's drain guarantees before it is dropped.

use std::io;
use std::ptr::NonNull;

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

pub(super) struct BufRing {
    /// `count` entries, page-aligned (mmap), shared with the kernel.
    entries: NonNull<BufRingEntry>,
    map_len: usize,
    bufs: Box<[u8]>,
    size: usize,
    count: u16,
    tail: u16,
    bgid: u16,
}

// SAFETY: the mapping is owned by this value and only touched by the thread that
// owns the reactor (and by the kernel through the registration).
unsafe impl Send for BufRing {}

impl BufRing {
    /// Maps and registers `count` (a power of two) buffers of `size` bytes as
    /// buffer group `bgid` of `ring`, all of them handed to the kernel.
    pub(super) fn register(ring: &IoUring, bgid: u16, count: u16, size: usize) -> io::Result<BufRing> {
        if !count.is_power_of_two() {
            return Err(io::Error::other("a buffer ring's size must be a power of two"));
        }
        let map_len = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(entries) = NonNull::new(ptr.cast::<BufRingEntry>()) else {
            return Err(io::Error::other("mmap returned a null mapping"));
        };
        let mut this = BufRing { entries, map_len, bufs: vec![0u8; usize::from(count) * size].into_boxed_slice(), size, count, tail: 0, bgid };
        // SAFETY: `count` page-aligned entries, mapped until `Drop`; the reactor
        // drops this only once no receive of its ring uses the group (module docs).
        unsafe { ring.submitter().register_buf_ring_with_flags(entries.as_ptr() as u64, count, bgid, 0)? };
        for bid in 0..count {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    pub(super) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// The first `len` bytes the kernel received into buffer `bid`.
    pub(super) fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid % self.count) * self.size;
        &self.bufs[start..start + len.min(self.size)]
    }

    /// Gives buffer `bid` back to the kernel, once its bytes are copied out.
    pub(super) fn recycle(&mut self, bid: u16) {
        self.push(bid % self.count);
        self.publish();
    }

    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.bufs[usize::from(bid) * self.size..].as_mut_ptr() as u64;
        // SAFETY: `index` < `count`, inside the mapping; the kernel reads only the
        // entries before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the kernel (release store of the tail).
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of our mapping; the kernel
        // reads it with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the reactor drops this only after
        // the kernel is done with it (drained, or the ring closed).
        unsafe { libc::munmap(self.entries.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{cqueue, opcode, types};
    use std::os::fd::AsRawFd;

    /// Sends `bytes` on `fd` (a blocking stream socket).
    fn send(fd: &std::os::fd::OwnedFd, bytes: &[u8]) {
        // SAFETY: a send from a live buffer on a socket we own.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(n, bytes.len() as isize);
    }

    /// Waits for the next completion: (result, buffer id, more).
    fn next(ring: &mut IoUring) -> (i32, Option<u16>, bool) {
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = ring.completion().next().expect("a completion");
        (cqe.result(), cqueue::buffer_select(cqe.flags()), cqueue::more(cqe.flags()))
    }

    #[test]
    fn a_multishot_receive_fills_the_given_buffers_and_ends_when_none_is_left() {
        let mut ring = IoUring::new(8).expect("io_uring");
        let mut bufs = BufRing::register(&ring, 3, 2, 16).expect("provided-buffer ring");
        let (ours, theirs) = crate::ipc::fdpass::stream_pair().expect("socketpair");
        let sqe = opcode::RecvMulti::new(types::Fd(ours.as_raw_fd()), bufs.bgid()).build().user_data(7);
        // SAFETY: the buffers live in `bufs` until the end of the test, after the
        // receive ended.
        unsafe { ring.submission().push(&sqe).expect("room for the SQE") };

        // Each message lands in a buffer of its own, and the receive stays armed.
        send(&theirs, b"first");
        let (res, bid, more) = next(&mut ring);
        assert_eq!((res, more), (5, true));
        let first = bid.expect("a buffer id");
        assert_eq!(bufs.get(first, 5), b"first");
        send(&theirs, b"second");
        let (res, bid, more) = next(&mut ring);
        assert_eq!((res, more), (6, true));
        let second = bid.expect("a buffer id");
        assert_ne!(first, second);
        assert_eq!(bufs.get(second, 6), b"second");

        // Both buffers are still ours: the next message finds none, and the
        // receive ends (it must be posted again), with the bytes left unread.
        send(&theirs, b"third");
        let (res, _, more) = next(&mut ring);
        assert_eq!((res, more), (-libc::ENOBUFS, false));

        // Given back, a buffer takes the waiting bytes in a new receive.
        bufs.recycle(first);
        bufs.recycle(second);
        // SAFETY: as above.
        unsafe { ring.submission().push(&sqe).expect("room for the SQE") };
        let (res, bid, more) = next(&mut ring);
        assert_eq!((res, more), (5, true));
        assert_eq!(bufs.get(bid.expect("a buffer id"), 5), b"third");

        // End of file ends it for good.
        drop(theirs);
        let (res, _, more) = next(&mut ring);
        assert_eq!((res, more), (0, false));
    }

    #[test]
    fn a_ring_size_must_be_a_power_of_two() {
        let ring = IoUring::new(8).expect("io_uring");
        assert!(BufRing::register(&ring, 0, 3, 16).is_err());
    }
}
