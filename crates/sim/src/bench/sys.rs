//! Operating-system probes: our own CPU time, the file-descriptor limit, and another process's
//! CPU time and resident set size read from `/proc`.

use std::time::Duration;

/// User + system CPU time consumed so far by this process (all threads), from
/// `getrusage(RUSAGE_SELF)`.
pub fn self_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

#[allow(unsafe_code)]
fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: `rusage` is a plain C struct for which all-zero bytes are a valid value, and
    // getrusage only writes into the struct we pass; on failure we keep the zeroes.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, exclusively borrowed `rusage` for the duration of the call.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn tv(t: libc::timeval) -> Duration {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u32::try_from(t.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the resulting soft limit.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    // SAFETY: all-zero is a valid `rlimit`; get/setrlimit only read/write the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, exclusively borrowed `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid `rlimit` that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// Clock ticks per second, the unit of the CPU times in `/proc/<pid>/stat`.
#[allow(unsafe_code)]
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// A snapshot of another process (the broker under test).
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// User + system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident set size in bytes (`VmRSS`).
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` if the process is gone or the files
/// cannot be parsed.
pub fn sample_process(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu: parse_stat_cpu(&stat, clock_ticks())?,
        rss_bytes: parse_vmrss(&status)?,
    })
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2) is
/// parenthesised and may contain spaces, so fields are counted after the last `)`.
fn parse_stat_cpu(stat: &str, ticks_per_sec: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); utime is field 14, i.e. index 11 here.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_sec.max(1),
    ))
}

/// `VmRSS` of a `/proc/<pid>/status` file, in bytes.
fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Cores a process used between two samples taken `elapsed` seconds apart.
pub fn cpu_cores(
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    elapsed: f64,
) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) => Some(a.cpu.saturating_sub(b.cpu).as_secs_f64() / elapsed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu(stat, 100), Some(Duration::from_secs(3)));
        let status = "Name:\tmosquitto\nVmPeak:\t  9000 kB\nVmRSS:\t    7356 kB\nThreads: 1\n";
        assert_eq!(parse_vmrss(status), Some(7356 * 1024));
        assert!(sample_process(std::process::id()).is_some());
    }
}
