//! The shard's timers firing: execution timeouts, worker-wait deadlines, start and
//! exit deadlines, respawn back-off.

use super::*;

impl Reactor {
    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::WorkerWait(id) => {
                    let Some(e) = self.execs.get(&id) else { continue };
                    if e.worker.is_some() || e.worker_wait_deadline > now {
                        continue;
                    }
                    let (token, waited) = (e.token, now.duration_since(e.submitted));
                    if let Some(t) = self.tokens.get_mut(&token) {
                        t.unqueue(id, self.config.index, &mut self.queued);
                    }
                    self.complete(
                        id,
                        Err(Error::DeadlineExceeded(format!(
                            "no workers available for code-{token} after waiting {} ms; load more workers or raise worker_wait_timeout",
                            waited.as_millis()
                        ))),
                    );
                }
                Timer::Deadline(id, key, gen) => {
                    let Some(e) = self.execs.get(&id) else {
                        self.kill_lingering(key, gen);
                        continue;
                    };
                    let (Some(key), Some(d)) = (e.worker, e.dispatched) else { continue };
                    if d + e.timeout > now {
                        continue;
                    }
                    let timeout = e.timeout;
                    // A response waits for its worker's exit with logs or in shared
                    // memory (see `on_response`).
                    let answered = e.response.is_some();
                    if let Some(body) = self.unread_answer(id) {
                        // Answered in time, but nobody read it (the caller never waited).
                        self.kill_worker(key);
                        let metrics = self.metrics(id, now);
                        self.complete(id, Ok(RawOutcome { body: body.into(), logs: None, metrics }));
                        continue;
                    }
                    self.kill_worker(key);
                    if answered {
                        // The response was complete; only the worker's exit was late:
                        // it is delivered, with the logs written so far.
                        self.finish_with_logs(id, key);
                        continue;
                    }
                    self.complete(
                        id,
                        Err(Error::DeadlineExceeded(format!(
                            "the execution exceeded its timeout of {} ms; its worker was killed",
                            timeout.as_millis()
                        ))),
                    );
                }
                Timer::StartBy(key, gen) => {
                    if self.settle_unconfirmed(key, gen) || self.kill_unstarted_bound(key, gen) {
                        continue;
                    }
                    let timeout = self.config.worker_start_timeout;
                    self.kill_stuck(key, gen, &[WState::Spawning], || {
                        format!("did not signal readiness within {} ms", timeout.as_millis())
                    });
                }
                Timer::ExitBy(key, gen) => self.kill_closed(key, gen),
                Timer::CallerRead(id) => {
                    let Some(e) = self.execs.get(&id) else { continue };
                    let Some((handoff, _)) = e.handoff.as_ref() else { continue };
                    if handoff.is_done() {
                        self.finish_caller_read(id);
                    } else if !e.engine_reads {
                        // Still reading (or its `TakeOver` is queued): look again.
                        self.timers.push(now + CALLER_RECHECK, CALLER_RECHECK, Timer::CallerRead(id));
                    }
                }
                Timer::Respawn(token) => {
                    if let Some(t) = self.tokens.get_mut(&token) {
                        if t.respawn_at.is_some_and(|a| a <= now) {
                            t.respawn_at = None;
                        }
                    }
                    self.fill_slots(token);
                }
            }
        }
    }

    /// At its start deadline, a worker still offered unconfirmed is taken back and
    /// its ready byte looked for: there, it is ready (offered again, confirmed);
    /// not there, it is a starting worker past its deadline (false: `StartBy`
    /// kills it). True when nothing is left to do (a caller claimed it: its
    /// execution settles it; or it was ready).
    pub(super) fn settle_unconfirmed(&mut self, key: u32, gen: u32) -> bool {
        let index = self.config.index;
        let Some(w) = self.unexited(key, gen) else { return false };
        if !(w.state == WState::Idle && w.unconfirmed) {
            return false;
        }
        let (token, fd) = (w.token, w.fd.clone());
        let Some(t) = self.tokens.get_mut(&token) else { return false };
        if !t.entry.per_shard[index].ready.withdraw(key, gen) {
            return true;
        }
        t.idle.retain(|k| *k != key);
        t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        if fd.is_some_and(|fd| crate::ring::take_ready_byte(&fd)) {
            self.on_ready(key);
            return true;
        }
        if let Some(w) = self.worker(key) {
            w.state = WState::Spawning;
            w.unconfirmed = false;
        }
        false
    }

    /// At its start deadline, a worker bound to its execution while starting
    /// (early dispatch) whose ready byte has not come is killed; its exit report
    /// then fails that execution and counts the failed start (see
    /// `on_worker_exit`). False if it is not such a worker.
    pub(super) fn kill_unstarted_bound(&mut self, key: u32, gen: u32) -> bool {
        let timeout = self.config.worker_start_timeout;
        let Some(w) = self.unexited(key, gen) else { return false };
        if !(w.ready_pending && w.state == WState::Busy) {
            return false;
        }
        w.failure = Some(format!("it did not signal readiness within {} ms and was killed", timeout.as_millis()));
        let token = w.token;
        tracing::warn!(shard = self.config.index, token, "a worker of code-{token} did not signal readiness in time; killed");
        self.kill_worker(key);
        true
    }

    /// The worker (key, generation) if it is still the same one and not reported
    /// exited (the check every worker timer starts with).
    pub(super) fn unexited(&mut self, key: u32, gen: u32) -> Option<&mut WorkerConn> {
        self.worker(key).filter(|w| w.gen == gen && w.exited.is_none())
    }

    /// The timeout of an execution that completed has passed: if its worker has
    /// still not exited (it answered, then kept running: the host closing the
    /// socket does not stop a UDF that ignores it), it is killed, so an untrusted
    /// binary cannot pile up processes beyond the pool.
    pub(super) fn kill_lingering(&mut self, key: u32, gen: u32) {
        let Some(w) = self.unexited(key, gen) else { return };
        if w.exec.is_some() {
            return;
        }
        let worker = w.worker_id;
        tracing::debug!(shard = self.config.index, worker, "a worker outlived its execution's timeout; killing it");
        self.kill_worker(key);
    }

    /// A worker (key, generation) still in one of `states` and not exited can no
    /// longer serve: it is killed and counted as a start-up failure of its code
    /// token (back-off; the oldest queued execution fails with `why`, built only
    /// then: these timers fire for every worker).
    pub(super) fn kill_stuck(&mut self, key: u32, gen: u32, states: &[WState], why: impl FnOnce() -> String) {
        let Some(w) = self.unexited(key, gen) else { return };
        if !states.contains(&w.state) {
            return;
        }
        let token = w.token;
        let why = why();
        tracing::warn!(shard = self.config.index, token, "a worker of code-{token} {why}; killed");
        self.note_failure(token, &format!("a worker of code-{token} {why}; it was killed"));
        self.kill_worker(key);
    }

    /// A worker (key, generation) closed its channel (or it broke) and has not
    /// been reported exited within the grace: it is killed, and what it was doing
    /// fails when the exit report comes (the runner reports the kill at once): a
    /// busy worker's execution (it can get no response: rather than at its
    /// timeout), or a starting or idle worker's start (see `on_worker_exit`). So
    /// the message names what ended the worker: on a starved machine a report may
    /// come after the grace although the UDF had died of a cause of its own (a
    /// crash) before. If no report comes, the execution's timeout or the sandbox's
    /// failure still completes it.
    pub(super) fn kill_closed(&mut self, key: u32, gen: u32) {
        let Some(w) = self.unexited(key, gen) else { return };
        if !matches!(w.state, WState::Busy | WState::Spawning | WState::Idle) {
            return;
        }
        let (token, state) = (w.token, w.state);
        w.killed_from = Some(state);
        if state != WState::Busy {
            tracing::warn!(shard = self.config.index, token, "a worker of code-{token} {}; killed", lingered_before_request());
        }
        self.kill_worker(key);
    }
}
