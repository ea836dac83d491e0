//! CPU accounting for the CLI's reports: the engine threads' CPU time and
//! wake-ups (exact, from `/proc/self/task/*/schedstat` and `status`), and the
//! sandbox's CPU ticks from `/proc/PID/stat`.

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Nanoseconds on CPU of this process's engine threads (`roma-ring-*`), from
/// `/proc/self/task/*/schedstat`: exact, where `stat`'s ticks are 10 ms apart.
/// Also counts the threads' sleeps: their voluntary context switches (from
/// `status`), one per wait that found nothing to do, i.e. one per wake-up.
fn engine_cpu() -> Option<EngineCpu> {
    let mut cpu = EngineCpu { ns: 0, sleeps: 0 };
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("roma-ring-") {
            let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            cpu.ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
            cpu.sleeps += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        }
    }
    Some(cpu)
}

/// The engine threads' CPU time and sleeps so far (see `engine_cpu`).
#[derive(Clone, Copy)]
struct EngineCpu {
    ns: u64,
    sleeps: u64,
}

/// CPU ticks (user + system) of the sandbox's top process and of the workers it
/// has reaped.
pub struct CpuSample {
    pub runner: u64,
    pub workers: u64,
}

fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = text.rsplit_once(')')?.1;
    // Fields after the command: state is index 0; utime is field 14 overall.
    Some(rest.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect())
}

impl CpuSample {
    pub fn take(sandbox_pid: u32) -> Option<CpuSample> {
        let f = stat_fields(&format!("/proc/{sandbox_pid}/stat"))?;
        Some(CpuSample { runner: f.get(10)? + f.get(11)?, workers: f.get(12)? + f.get(13)? })
    }
}

/// A per-execution figure from ticks, or "?" where `/proc` did not have it.
pub fn ticks_us(v: Option<f64>) -> String {
    v.map_or("?".to_string(), |v| format!("{v:.1} µs"))
}

/// Both kinds of sample at one moment (either may be missing: no `/proc`).
pub struct Snapshot {
    engine: Option<EngineCpu>,
    sandbox: Option<CpuSample>,
}

/// CPU per execution between two snapshots.
#[derive(Clone, Copy, Debug)]
pub struct PerExecution {
    /// The engine threads' CPU time (schedstat: exact), µs.
    pub engine_us: f64,
    /// The engine threads' sleeps, i.e. wake-ups.
    pub engine_wakeups: f64,
    /// The sandbox's top process (10 ms ticks), µs.
    pub runner_us: Option<f64>,
    /// The workers the sandbox's top process has reaped (10 ms ticks), µs.
    pub workers_us: Option<f64>,
}

impl Snapshot {
    pub fn take(sandbox_pid: u32) -> Snapshot {
        Snapshot { engine: engine_cpu(), sandbox: CpuSample::take(sandbox_pid) }
    }

    /// From this snapshot to `after`, over `executions` (None without the engine
    /// threads' figures or without executions).
    pub fn per_execution(&self, after: &Snapshot, executions: u64) -> Option<PerExecution> {
        let (before_e, after_e) = (self.engine?, after.engine?);
        if executions == 0 {
            return None;
        }
        let n = executions as f64;
        let ticks = |a: u64, b: u64| a.saturating_sub(b) as f64 * 1e6 / ticks_per_second() / n;
        let sandbox = self.sandbox.as_ref().zip(after.sandbox.as_ref());
        Some(PerExecution {
            engine_us: after_e.ns.saturating_sub(before_e.ns) as f64 / 1e3 / n,
            engine_wakeups: after_e.sleeps.saturating_sub(before_e.sleeps) as f64 / n,
            runner_us: sandbox.map(|(b, a)| ticks(a.runner, b.runner)),
            workers_us: sandbox.map(|(b, a)| ticks(a.workers, b.workers)),
        })
    }
}
