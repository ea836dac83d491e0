//! Ready workers a shard offers to callers (per code token and shard).
//!
//! A caller that claims an offer owns that worker's request: it writes the request
//! (or, on the shared-memory transport, places it in the region and rings the
//! doorbell) from its own thread, after queueing the execution on the shard, so the
//! shard need not wake up to send it (see `Engine::submit`). Whoever removes an
//! offer first owns the worker: the shard takes workers for its own queue only
//! through [`ReadyWorkers::withdraw`], which fails once a caller has claimed it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ipc::shm::WorkerRegion;

/// One ready worker.
pub(crate) struct Offer {
    /// Shard-local key and generation of the worker.
    pub key: u32,
    pub gen: u32,
    /// The host end of its channel. The caller's clone keeps the descriptor open
    /// (and its number from being reused) while it writes.
    pub fd: Arc<OwnedFd>,
    /// Its shared-memory region, on that transport.
    pub region: Option<Arc<WorkerRegion>>,
    /// The shard has a receive posted on it: the shard reads its response. Not
    /// armed (`TokenEntry::direct` only): a caller that waits reads it itself, and
    /// any other must wake the shard to post the receive.
    pub armed: bool,
    /// Offered before the shard read its ready byte (`Config::lazy_readiness`): the
    /// claimer takes the byte itself ([`take_ready_byte`]) before it writes the
    /// request; if it is not there yet, the claimer writes nothing and leaves the
    /// execution to the shard, which waits for the byte as for any starting worker.
    pub unconfirmed: bool,
}

#[derive(Default)]
pub(crate) struct ReadyWorkers {
    ready: Mutex<VecDeque<Offer>>,
}

impl std::fmt::Debug for ReadyWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadyWorkers({})", self.lock().len())
    }
}

impl ReadyWorkers {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Offer>> {
        match self.ready.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        }
    }

    /// Offers a worker to callers.
    pub fn publish(&self, offer: Offer) {
        self.lock().push_back(offer);
    }

    /// Takes the offer of worker (`key`, `gen`) back: true if it was still offered
    /// (the shard owns the worker again), false if a caller claimed it.
    pub fn withdraw(&self, key: u32, gen: u32) -> bool {
        let mut q = self.lock();
        match q.iter().position(|o| o.key == key && o.gen == gen) {
            Some(i) => {
                q.remove(i);
                true
            }
            None => false,
        }
    }

    /// Claims the longest-ready worker, if any.
    pub fn claim(&self) -> Option<Offer> {
        self.lock().pop_front()
    }

    /// Withdraws every offer (the shard lost its workers).
    pub fn clear(&self) {
        let gone = std::mem::take(&mut *self.lock());
        drop(gone);
    }
}

/// Takes a worker's ready byte from its channel without blocking: true if the
/// byte was there (the worker has started and now waits for its request), false
/// if not yet, or the channel is closed or failed (the shard learns why).
pub(crate) fn take_ready_byte(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    loop {
        // SAFETY: receiving at most one byte into a live local on a socket the
        // caller holds open.
        let n = unsafe { libc::recv(fd.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_DONTWAIT) };
        if n == 1 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn offer(key: u32, gen: u32) -> Offer {
        // SAFETY: plain eventfd creation (any descriptor will do for the test).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned here.
        Offer { key, gen, fd: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }), region: None, armed: true, unconfirmed: false }
    }

    #[test]
    fn whoever_removes_an_offer_first_owns_the_worker() {
        let r = ReadyWorkers::default();
        r.publish(offer(1, 7));
        r.publish(offer(2, 7));
        // A caller claims the oldest; the shard can no longer withdraw it.
        let c = r.claim().unwrap();
        assert_eq!((c.key, c.gen), (1, 7));
        assert!(!r.withdraw(1, 7));
        // A withdrawn offer cannot be claimed; a stale generation is not withdrawn.
        assert!(!r.withdraw(2, 8));
        assert!(r.withdraw(2, 7));
        assert!(r.claim().is_none());
        r.publish(offer(3, 1));
        r.clear();
        assert!(r.claim().is_none());
    }

    #[test]
    fn a_ready_byte_is_taken_once_and_only_when_there() {
        let (host, worker) = crate::ipc::fdpass::stream_pair().unwrap();
        assert!(!take_ready_byte(&host), "nothing written yet");
        // SAFETY: sending from a live two-byte slice on an open socket.
        let n = unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(&worker), b"rx".as_ptr().cast(), 2, 0) };
        assert_eq!(n, 2);
        assert!(take_ready_byte(&host));
        // Exactly one byte was consumed: the next one is still there.
        assert!(take_ready_byte(&host));
        assert!(!take_ready_byte(&host));
        drop(worker);
        assert!(!take_ready_byte(&host), "end of file is no ready byte");
    }
}
