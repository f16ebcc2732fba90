//! What the agent is and what it costs as a process: `netprobe_build_info` and the standard
//! `process_*` metrics (CPU, resident memory, open fds), read from `/proc/self` at each scrape so
//! a dashboard shows the agent's own cost next to its programs' in-kernel run time.

use super::exposition::{Family, Labels, Samples};

/// `netprobe_build_info{version,git_commit,kernel,arch} 1`. `git_commit` is there when the
/// build set `NETPROBE_GIT_COMMIT` (the image recipe does); `kernel` is the running kernel's
/// release (drop reasons and offsets come from its BTF).
pub fn build_info() -> Family {
    let labels = Labels::new()
        .with("version", env!("CARGO_PKG_VERSION"))
        .with(
            "git_commit",
            option_env!("NETPROBE_GIT_COMMIT").unwrap_or(""),
        )
        .with("kernel", kernel_release())
        .with("arch", std::env::consts::ARCH);
    Family::gauges(
        "netprobe_build_info",
        "The agent's version, git commit (when built with NETPROBE_GIT_COMMIT), the node's kernel release and the architecture; always 1.",
        [(labels, 1)],
    )
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CPU time, resident memory and open file descriptors of this process (absent where `/proc`
/// cannot be read).
pub fn cost() -> Vec<Family> {
    let mut out = Vec::new();
    if let Some((cpu, rss)) =
        cpu_and_rss(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
    {
        out.push(Family::new(
            "process_cpu_seconds_total",
            "User and system CPU time the agent process spent, in seconds.",
            Samples::CounterF64(vec![(Labels::new(), cpu)]),
        ));
        out.push(Family::gauge(
            "process_resident_memory_bytes",
            "Resident memory of the agent process, in bytes.",
            rss,
        ));
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.push(Family::gauge(
            "process_open_fds",
            "Open file descriptors of the agent process (tcx links, maps, sockets).",
            fds.count() as i64,
        ));
    }
    out
}

/// (CPU seconds, resident bytes) from `/proc/self/stat`: utime and stime (fields 14, 15, in
/// clock ticks) and rss (field 24, in pages). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn cpu_and_rss(stat: &str) -> Option<(f64, i64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<i64>().ok();
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    let cpu = (field(14)? + field(15)?) as f64 / ticks as f64;
    // c_long is i64 on the 64-bit targets the agent runs on (amd64, arm64).
    Some((cpu, field(24)? * page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_rss_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 10000000 7 18446744073709551615";
        let (cpu, rss) = cpu_and_rss(stat).expect("parsed");
        assert!((cpu - 300.0 / ticks).abs() < 1e-9, "{cpu}");
        assert_eq!(rss, 7 * page);
        assert!(
            cost()
                .iter()
                .any(|f| f.name == "process_resident_memory_bytes")
        );
    }

    #[test]
    fn build_info_names_the_version_and_the_kernel_and_no_empty_label() {
        let text = super::super::exposition::text(vec![build_info()]);
        let line = text
            .lines()
            .find(|l| l.starts_with("netprobe_build_info{"))
            .expect("a sample");
        assert!(
            line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{line}"
        );
        assert!(
            line.contains("kernel=\"") && line.ends_with("} 1"),
            "{line}"
        );
        assert!(!line.contains("=\"\""), "{line}");
    }
}
