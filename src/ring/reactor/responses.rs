//! An execution's end: its response, its metrics, the answer to its caller, or
//! its worker's failure.

use super::*;

impl Reactor {
    pub(super) fn garbage(&mut self, key: u32, why: String) {
        self.fail_worker(key, format!("the UDF wrote a malformed response frame: {why}"));
    }

    /// Kills the worker and fails its execution with `Unavailable(message)`.
    pub(super) fn fail_worker(&mut self, key: u32, message: String) {
        let exec = self.worker(key).and_then(|w| w.exec);
        self.kill_worker(key);
        if let Some(id) = exec {
            self.complete(id, Err(Error::Unavailable(message)));
        }
    }

    pub(super) fn on_response(&mut self, key: u32, body: ResponseBody) {
        let Some(w) = self.worker(key) else { return };
        let Some(id) = w.exec else { return };
        let wait_for_exit = w.logs.is_some() || matches!(body, ResponseBody::InRegion(..));
        let exited = w.exited.is_some();
        let now = Instant::now();
        match body {
            ResponseBody::Buf(body) if !wait_for_exit => {
                let metrics = self.metrics(id, now);
                self.complete(id, Ok(RawOutcome { body: body.into(), logs: None, metrics }));
            }
            body => {
                if let Some(e) = self.execs.get_mut(&id) {
                    e.response = Some((body, now));
                }
                if exited {
                    self.finish_with_logs(id, key);
                }
            }
        }
        self.close_channel(key);
    }

    /// Completes an execution whose response waited for its worker's exit.
    pub(super) fn finish_with_logs(&mut self, id: u64, key: u32) {
        let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else { return };
        let logs = w.logs.as_ref().map(|(out, err)| Logs { stdout: read_all(out), stderr: read_all(err) });
        let region = w.shm.as_ref().map(|(r, _)| r.clone());
        let Some((body, at)) = self.execs.get_mut(&id).and_then(|e| e.response.take()) else { return };
        let body = match (body, region) {
            (ResponseBody::Buf(b), _) => b.into(),
            (ResponseBody::InRegion(off, len), Some(region)) => match region.view(off, len) {
                Some(shared) => shared,
                // Not reaped (the deadline came first): the worker may still write
                // the region, so copy.
                None => match region.region().copy_out(off, len) {
                    Ok(b) => b.into(),
                    Err(e) => {
                        self.complete(id, Err(Error::Unavailable(e)));
                        return;
                    }
                },
            },
            (ResponseBody::InRegion(..), None) => {
                self.complete(id, Err(Error::Internal("a shared-memory response without its region".into())));
                return;
            }
        };
        let metrics = self.metrics(id, at);
        self.complete(id, Ok(RawOutcome { body, logs, metrics }));
    }

    pub(super) fn metrics(&self, id: u64, done: Instant) -> Metrics {
        let Some(e) = self.execs.get(&id) else { return Metrics::default() };
        let dispatched = e.dispatched.unwrap_or(done);
        // Written before the ready byte (early dispatch): the response counts from
        // that byte.
        let sent = e.sent.unwrap_or(done).max(dispatched);
        Metrics {
            wait_for_worker: dispatched.saturating_duration_since(e.submitted),
            send: sent.saturating_duration_since(dispatched),
            response: done.saturating_duration_since(sent),
            idle_workers_left: e.idle_left,
            handed_over: e.handed.is_some(),
            read_by_caller: false,
            written_before_ready: e.written_before_ready,
        }
    }

    pub(super) fn complete(&mut self, id: u64, result: crate::completion::RawResult) {
        self.finish(id, Some(result));
    }

    /// Forgets execution `id` and answers it with `result`. No answer when there is
    /// none, or when the caller read the response first (the shard takes every
    /// other execution over, see `take_over`): then it has its answer, and the
    /// worker's slot is released.
    pub(super) fn finish(&mut self, id: u64, result: Option<crate::completion::RawResult>) {
        let Some(mut exec) = self.execs.remove(&id) else { return };
        let caller_has_it = match (&exec.handoff, &result) {
            (Some(_), None) => true,
            (Some((handoff, fd)), Some(_)) => engine_takes_waking(handoff, fd.as_deref()) == Taken::CallerDone,
            (None, _) => false,
        };
        let mut busy = None;
        if let Some(key) = exec.worker {
            if let Some(w) = self.worker(key) {
                if w.exec == Some(id) {
                    w.exec = None;
                    busy = (w.state == WState::Busy).then_some(key);
                }
            }
        }
        // The execution's copy of the worker's channel: closed through the ring if
        // it is the last one (no `close` syscall on this thread).
        if let Some((_, Some(fd))) = exec.handoff.take() {
            self.close_shared(fd);
        }
        match (exec.sink.take(), result) {
            (Some(sink), Some(result)) if !caller_has_it => {
                self.woke_waiter |= sink.is_channel();
                sink.complete(result);
            }
            (sink, _) => {
                if let Some(sink) = sink {
                    sink.release();
                }
                if let Some(key) = busy.filter(|_| caller_has_it) {
                    self.close_channel(key);
                }
            }
        }
    }
}
