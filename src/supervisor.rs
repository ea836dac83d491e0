//! The engine's supervisor thread: owns the sandbox process, restarts the sandbox
//! when it dies (every shard reconnects and re-creates its workers), and tears it
//! down at shutdown.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use crate::ring::{Cmd, ShardShared, SupervisorEvent};
use crate::sandbox::launch::{Launcher, Sandbox};

const RESTART_ATTEMPTS: u32 = 5;
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct Supervisor {
    pub launcher: Launcher,
    pub sandbox: Sandbox,
    pub shards: Vec<Arc<ShardShared>>,
    pub events: Receiver<SupervisorEvent>,
    pub sandbox_pid: Arc<AtomicU32>,
}

impl Supervisor {
    pub(crate) fn run(mut self) {
        let mut epoch = 0u64;
        loop {
            match self.events.recv() {
                Ok(SupervisorEvent::RunnerDied { epoch: e }) if e == epoch => {
                    // Every shard stops using the dead sandbox now, not when its own
                    // connection reports EOF.
                    for shard in &self.shards {
                        shard.push(Cmd::RunnerDown { epoch });
                    }
                    if self.restart(epoch + 1) {
                        epoch += 1;
                    } else {
                        // Fatal: shards fail everything; wait for shutdown.
                        epoch = u64::MAX;
                    }
                }
                Ok(SupervisorEvent::RunnerDied { .. }) => {}
                Ok(SupervisorEvent::Shutdown) | Err(_) => break,
            }
        }
        // The shards have closed their control connections: the runner exits.
        self.launcher.stop(&mut self.sandbox, STOP_GRACE);
        self.launcher.cleanup();
    }

    fn restart(&mut self, next_epoch: u64) -> bool {
        tracing::warn!(pid = self.sandbox.pid(), "the sandbox died; restarting it");
        self.launcher.destroy(&mut self.sandbox);
        let mut delay = Duration::from_millis(50);
        let mut last_error = String::new();
        for attempt in 1..=RESTART_ATTEMPTS {
            match self.launcher.launch() {
                Ok(launched) => {
                    self.sandbox = launched.sandbox;
                    self.sandbox_pid.store(self.sandbox.pid(), Ordering::Release);
                    for (shard, ctl) in self.shards.iter().zip(launched.controls) {
                        shard.push(Cmd::Reconnect { epoch: next_epoch, ctl, runner: launched.runner.clone() });
                    }
                    tracing::info!(attempt, pid = self.sandbox.pid(), "sandbox restarted; re-creating workers");
                    return true;
                }
                Err(e) => {
                    tracing::error!(attempt, error = %e, "sandbox restart failed");
                    last_error = e.to_string();
                    std::thread::sleep(delay);
                    delay *= 2;
                }
            }
        }
        let why = format!(
            "the sandbox died and could not be restarted after {RESTART_ATTEMPTS} attempts ({last_error}); create a new engine"
        );
        for shard in &self.shards {
            shard.push(Cmd::RunnerFatal(why.clone()));
        }
        false
    }
}
