//! CPU time and memory of a process (the hub, or the load generator itself) from `/proc`.

use std::sync::OnceLock;

use serde_json::{json, Value};

use super::BenchError;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// User + system CPU time of every thread, in seconds.
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since the process started, KiB.
    pub hwm_kib: u64,
}

/// Which process to read: `self` or a pid.
#[derive(Debug, Clone)]
pub struct Proc {
    dir: String,
}

impl Proc {
    pub fn me() -> Self {
        Self {
            dir: "/proc/self".into(),
        }
    }

    pub fn pid(pid: u32) -> Self {
        Self {
            dir: format!("/proc/{pid}"),
        }
    }

    pub fn sample(&self) -> Result<Sample, BenchError> {
        let read = |file: &str| {
            let path = format!("{}/{file}", self.dir);
            std::fs::read_to_string(&path)
                .map_err(|e| BenchError::Proc(format!("cannot read {path}: {e}")))
        };
        let stat = read("stat")?;
        let status = read("status")?;
        let ticks = parse_cpu_ticks(&stat)
            .ok_or_else(|| BenchError::Proc(format!("unexpected format of {}/stat", self.dir)))?;
        Ok(Sample {
            cpu_s: ticks as f64 / clock_ticks_per_second() as f64,
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        })
    }

    /// The soft limit on open files, from `limits`.
    pub fn open_files_limit(&self) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("{}/limits", self.dir)).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// utime + stime (fields 14 and 15) of `/proc/PID/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 (state) is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// `getconf CLK_TCK`, read once; 100 (the Linux default) if that fails.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// Readings of one process at the phases of a run.
#[derive(Debug, Clone)]
pub struct Usage {
    pub before: Sample,
    /// After set-up (connections), before the measured phase.
    pub ready: Sample,
    pub after: Sample,
}

impl Usage {
    /// CPU seconds spent in the measured phase.
    pub fn cpu_s(&self) -> f64 {
        (self.after.cpu_s - self.ready.cpu_s).max(0.0)
    }

    /// The JSON form; `per` is the count the CPU time is divided by (deliveries or messages),
    /// `wall` the length of the measured phase (for `cpu_busy`, in cores).
    pub fn to_json(&self, per: u64, per_name: &str, wall: std::time::Duration) -> Value {
        let per_unit = if per == 0 {
            Value::Null
        } else {
            json!(((self.cpu_s() * 1e6 / per as f64) * 1000.0).round() / 1000.0)
        };
        let mut v = json!({
            "cpu_s_setup": round3(self.ready.cpu_s - self.before.cpu_s),
            "cpu_s": round3(self.cpu_s()),
            "cpu_busy": round3(self.cpu_s() / wall.as_secs_f64().max(1e-9)),
            "rss_kib_before": self.before.rss_kib,
            "rss_kib_ready": self.ready.rss_kib,
            "rss_kib_after": self.after.rss_kib,
            "rss_kib_peak": self.after.hwm_kib,
        });
        v[format!("cpu_us_per_{per_name}")] = per_unit;
        v
    }
}

fn round3(x: f64) -> f64 {
    (x.max(0.0) * 1000.0).round() / 1000.0
}

/// Samples an optional process, turning a vanished process into `None` with a warning.
pub fn try_sample(proc_: Option<&Proc>) -> Option<Sample> {
    let p = proc_?;
    match p.sample() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot sample the process");
            None
        }
    }
}

/// Busy and total jiffies of the whole machine (`cpu`) and of each CPU (`cpu0`, `cpu1`, …),
/// from `/proc/stat`: how much else ran while the bench did (a noisy neighbour shows here).
#[derive(Debug, Clone, Default)]
pub struct MachineSample {
    /// (name, busy, total) per line.
    cpus: Vec<(String, u64, u64)>,
}

impl MachineSample {
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        Some(parse_proc_stat(&stat))
    }

    /// Busy fraction of each CPU between `self` and `later` (`cpu` is the average, in cores).
    pub fn busy_since(&self, later: &MachineSample) -> Value {
        let mut out = serde_json::Map::new();
        for (name, busy, total) in &later.cpus {
            let Some((_, b0, t0)) = self.cpus.iter().find(|(n, _, _)| n == name) else {
                continue;
            };
            let dt = total.saturating_sub(*t0);
            if dt == 0 {
                continue;
            }
            let frac = busy.saturating_sub(*b0) as f64 / dt as f64;
            // The `cpu` line sums every CPU: report it in cores.
            let cores = if name == "cpu" {
                frac * (later.cpus.len().saturating_sub(1)).max(1) as f64
            } else {
                frac
            };
            let key = if name == "cpu" {
                "all_cores".to_owned()
            } else {
                name.clone()
            };
            out.insert(key, json!(round3(cores)));
        }
        Value::Object(out)
    }
}

fn parse_proc_stat(stat: &str) -> MachineSample {
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu"))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let name = fields.next()?.to_owned();
            let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some((name, total.saturating_sub(idle), total))
        })
        .collect();
    MachineSample { cpus }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (tidings (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let status = "Name:\ttidings\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        let me = Proc::me().sample().expect("/proc/self");
        assert!(me.rss_kib > 0);
        assert!(Proc::me().open_files_limit().unwrap_or(1) > 0);
        let a = parse_proc_stat("cpu 100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0\nintr 5\n");
        let b = parse_proc_stat(
            "cpu 200 0 150 850 0 0 0 0 0 0\ncpu0 150 0 50 400 0 0 0 0\ncpu1 50 0 100 450 0 0 0 0\n",
        );
        let busy = a.busy_since(&b);
        assert_eq!(busy["cpu0"], 1.0);
        assert_eq!(busy["cpu1"], 0.5);
        assert_eq!(busy["all_cores"], 1.5);
    }
}
