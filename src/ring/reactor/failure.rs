//! Failure of the whole shard or of its runner connection: every execution it
//! holds completes with an error, exactly once.

use super::*;

impl Reactor {
    /// The sandbox is gone: in-flight executions fail, workers are forgotten, and
    /// the supervisor is told so it can restart the sandbox. Queued executions wait
    /// (within their worker-wait timeout) for the restarted sandbox.
    pub(super) fn runner_gone(&mut self, why: &str) {
        if self.runner_dead {
            return;
        }
        tracing::error!(shard = self.config.index, epoch = self.epoch, "{why}");
        self.runner_dead = true;
        // SAFETY: shutting down our own socket so pending control ops complete.
        unsafe { libc::shutdown(self.ctl.as_raw_fd(), libc::SHUT_RDWR) };
        self.requeue_unstarted();
        let msg = format!("{why}; the execution's worker was lost (the sandbox is being restarted)");
        let busy: Vec<u64> = self.execs.iter().filter(|(_, e)| e.worker.is_some()).map(|(id, _)| *id).collect();
        for id in busy {
            self.complete(id, Err(Error::Unavailable(msg.clone())));
        }
        for key in 0..self.workers.len() as u32 {
            if let Some(w) = self.worker(key) {
                w.exited.get_or_insert(0);
                w.state = WState::Finished;
                if let Some(fd) = w.fd.as_ref() {
                    // SAFETY: shutting down a socket we own.
                    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
                self.maybe_free(key);
            }
        }
        for t in self.tokens.values_mut() {
            t.live = 0;
            t.idle.clear();
            t.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
            t.entry.per_shard[self.config.index].ready.clear();
        }
        let _ = self.shared.events.send(SupervisorEvent::RunnerDied { epoch: self.epoch });
    }

    /// The sandbox died: executions written to workers that never signalled
    /// readiness (early dispatch) go back to the front of their queues, oldest
    /// first, to run in the restarted sandbox like every queued execution. Such a
    /// worker sent nothing (its first byte would have been its ready byte), so by
    /// the protocol it never read the request, and made no host call.
    pub(super) fn requeue_unstarted(&mut self) {
        let mut back: Vec<(u64, u32)> = self
            .execs
            .iter()
            .filter_map(|(id, e)| {
                let key = e.worker?;
                let w = self.workers.get(key as usize)?.as_ref()?;
                (w.ready_pending && !e.frame.is_empty() && self.tokens.contains_key(&e.token)).then_some((*id, key))
            })
            .collect();
        back.sort_unstable_by_key(|&(id, _)| std::cmp::Reverse(id));
        let now = Instant::now();
        for (id, key) in back {
            if let Some(w) = self.worker(key) {
                w.exec = None;
            }
            let Some(e) = self.execs.get_mut(&id) else { continue };
            (e.worker, e.written, e.sent, e.dispatched, e.written_before_ready) = (None, 0, None, None, false);
            // Its worker wait ends when it did (a timer that fired while the
            // execution had a worker was skipped).
            let (token, wait_until) = (e.token, e.worker_wait_deadline.max(now));
            self.timers.push(wait_until, wait_until - now, Timer::WorkerWait(id));
            if let Some(t) = self.tokens.get_mut(&token) {
                t.queue.push_front(id);
                t.note_queue(self.config.index, &mut self.queued);
            }
        }
    }

    pub(super) fn fail_everything(&mut self, why: &str) {
        self.fail_all(|| Error::Unavailable(why.to_string()));
    }

    /// Completes every execution with `error()` and offers no worker any more.
    pub(super) fn fail_all(&mut self, error: impl Fn() -> Error) {
        let ids: Vec<u64> = self.execs.keys().copied().collect();
        for id in ids {
            self.complete(id, Err(error()));
        }
        for t in self.tokens.values_mut() {
            t.queue.clear();
            t.note_queue(self.config.index, &mut self.queued);
            t.idle.clear();
            t.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
            t.entry.per_shard[self.config.index].ready.clear();
        }
    }
}
