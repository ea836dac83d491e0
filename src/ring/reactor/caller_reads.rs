//! Executions whose calling thread reads the response itself (`ring::direct`):
//! how the shard starts, finishes or takes over such a read.

use super::*;

impl Reactor {
    /// A busy worker whose response the shard has not read exited (see `direct`):
    /// true if that is handled here. The answer, if any, is still in the socket, or
    /// with the caller.
    pub(super) fn exit_before_read(&mut self, id: u64, key: u32) -> bool {
        let Some(exec) = self.execs.get(&id) else { return false };
        let Some((handoff, _)) = exec.handoff.as_ref() else { return false };
        if exec.engine_reads {
            return false;
        }
        if handoff.is_done() {
            // The caller has the answer (its `CallerDone` is on the way).
            self.finish_caller_read(id);
            return true;
        }
        match handoff.engine_takes_unless_reading() {
            // The caller is reading what the worker left: it finishes (its
            // `CallerDone` wakes nobody: the shard looks again shortly, so that the
            // slot refills), or gives the execution back (`TakeOver`).
            Taken::FromCaller => {
                self.timers.push(Instant::now() + CALLER_RECHECK, CALLER_RECHECK, Timer::CallerRead(id));
                true
            }
            Taken::CallerDone => {
                self.finish_caller_read(id);
                true
            }
            // Nobody was reading, or the caller gave it back: read the socket; its
            // end of file then completes the execution with the exit status.
            Taken::Unread | Taken::Already => {
                self.start_reading(id, key);
                true
            }
        }
    }

    /// The shard reads execution `id`'s response from worker `key` from now on.
    pub(super) fn start_reading(&mut self, id: u64, key: u32) {
        let Some(exec) = self.execs.get_mut(&id) else { return };
        if exec.engine_reads {
            return;
        }
        exec.engine_reads = true;
        let armed = self.worker(key).is_none_or(|w| w.armed || w.fd.is_none());
        if !armed {
            self.post_worker_recv(key, RECV_CHUNK, false);
        }
    }

    /// The caller read execution `id`'s response itself: forget it, and let the
    /// worker's slot refill.
    pub(super) fn finish_caller_read(&mut self, id: u64) {
        self.finish(id, None);
    }

    /// `Cmd::TakeOver`: the caller left the response to the shard.
    pub(super) fn on_take_over(&mut self, id: u64) {
        let Some(key) = self.execs.get(&id).and_then(|e| e.worker) else { return };
        let busy = self.worker(key).is_some_and(|w| w.exec == Some(id) && w.state == WState::Busy);
        if busy {
            self.start_reading(id, key);
        }
    }

    /// `Cmd::CallerDone`.
    pub(super) fn on_caller_done(&mut self, id: u64, fd: Arc<OwnedFd>) {
        drop(fd);
        if self.execs.get(&id).and_then(|e| e.handoff.as_ref()).is_some_and(|(h, _)| h.is_done()) {
            self.finish_caller_read(id);
        }
    }

    /// At execution `id`'s deadline, if nobody has read its socket yet: the shard
    /// takes it over, and returns the response if one whole frame is waiting.
    pub(super) fn unread_answer(&mut self, id: u64) -> Option<Vec<u8>> {
        let exec = self.execs.get(&id)?;
        if exec.engine_reads || exec.handoff.is_none() {
            return None;
        }
        if self.take_over(id) != Taken::Unread {
            return None;
        }
        let fd = self.execs.get(&id)?.handoff.as_ref()?.1.clone()?;
        match direct::peek_frame(&fd, self.config.max_response_bytes) {
            Peeked::Frame(body) => Some(body),
            Peeked::Empty | Peeked::Partial | Peeked::Other => None,
        }
    }

    /// The shard takes handed-over execution `id` over (see `engine_takes_waking`;
    /// `finish` does the same for every answer).
    pub(super) fn take_over(&mut self, id: u64) -> Taken {
        match self.execs.get(&id).and_then(|e| e.handoff.as_ref()) {
            Some((handoff, fd)) => engine_takes_waking(handoff, fd.as_deref()),
            None => Taken::Already,
        }
    }
}
