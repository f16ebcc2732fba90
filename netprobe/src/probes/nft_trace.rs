//! The one ruleset change a trace makes: a netprobe-owned nf_tables table (`inet netprobe_<pid>`)
//! whose chains sit at the earliest priority of prerouting and output and set `meta nftrace` on
//! the traced flow only. nf_tables then reports, on the trace netlink group, every rule the
//! flow's packets match in every table — iptables-nft rules included. The table is removed when
//! the trace ends (also on error and Ctrl-C: [`TraceTable`] removes it on drop); tables of a
//! netprobe that was killed are removed at the next start.

use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
};

use crate::{
    attribution::rules::NETPROBE_TABLE_PREFIX,
    error::{Error, Result},
    netns::NetnsRef,
};

/// Earliest possible priority: before raw (-300), conntrack (-200) and every CNI chain.
const PRIORITY: &str = "-2147483648";

fn nft(stdin: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    child.wait_with_output()
}

/// The nft script for a flow: `proto` (`tcp` or `udp`) to or from `port`, optionally to or
/// from `addr`.
pub fn table_script(name: &str, proto: &str, port: u16, addr: Option<IpAddr>) -> String {
    let addr_match = |dir: &str| match addr {
        Some(IpAddr::V4(a)) => format!("ip {dir}addr {a} "),
        Some(IpAddr::V6(a)) => format!("ip6 {dir}addr {a} "),
        None => String::new(),
    };
    let mut rules = String::new();
    for port_dir in ["dport", "sport"] {
        for addr_dir in if addr.is_some() {
            vec!["s", "d"]
        } else {
            vec![""]
        } {
            let a = if addr_dir.is_empty() {
                String::new()
            } else {
                addr_match(addr_dir)
            };
            rules.push_str(&format!(
                "{a}meta l4proto {proto} th {port_dir} {port} meta nftrace set 1\n"
            ));
        }
    }
    let chain = |n: &str, hook: &str| {
        format!(
            "  chain {n} {{\n    type filter hook {hook} priority {PRIORITY}; policy accept;\n{rules}  }}\n"
        )
    };
    format!(
        "table inet {name} {{\n{}{}}}\n",
        chain("pre", "prerouting"),
        chain("out", "output")
    )
}

/// A trace table installed in one namespace; removed on drop.
pub struct TraceTable {
    netns: NetnsRef,
    name: String,
}

impl TraceTable {
    pub fn install(netns: &NetnsRef, proto: &str, port: u16, addr: Option<IpAddr>) -> Result<Self> {
        let name = format!("{NETPROBE_TABLE_PREFIX}{}", std::process::id());
        let script = table_script(&name, proto, port, addr);
        netns.run(|| -> Result<()> {
            remove_stale();
            let out = nft(&script, &["-f", "-"])
                .map_err(|e| Error::io("running nft (is nftables installed?)", e))?;
            if !out.status.success() {
                return Err(Error::io(
                    format!(
                        "installing trace table {name}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    std::io::Error::other("nft failed"),
                ));
            }
            Ok(())
        })??;
        Ok(Self {
            netns: netns.clone(),
            name,
        })
    }

    pub fn remove(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = std::mem::take(&mut self.name);
        let _ = self
            .netns
            .run(|| nft("", &["delete", "table", "inet", &name]));
    }
}

impl Drop for TraceTable {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes `netprobe_<pid>` tables whose process is gone (a killed trace) from `netns`.
pub fn remove_stale_in(netns: &NetnsRef) -> Result<()> {
    netns.run(remove_stale)
}

/// Removes `netprobe_<pid>` tables whose process is gone (a killed trace). Runs in the namespace.
fn remove_stale() {
    let Ok(out) = nft("", &["list", "tables", "inet"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.trim().strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NETPROBE_TABLE_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nft("", &["delete", "table", "inet", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_matches_both_directions_and_the_address() {
        let s = table_script("netprobe_1", "tcp", 9004, None);
        assert!(s.contains("hook prerouting priority -2147483648"));
        assert!(s.contains("hook output priority -2147483648"));
        assert_eq!(s.matches("th dport 9004 meta nftrace set 1").count(), 2);
        assert_eq!(s.matches("th sport 9004 meta nftrace set 1").count(), 2);
        let s = table_script(
            "netprobe_1",
            "tcp",
            9004,
            Some("10.43.51.131".parse().unwrap()),
        );
        assert!(s.contains("ip daddr 10.43.51.131 meta l4proto tcp th dport 9004"));
        assert!(s.contains("ip saddr 10.43.51.131 meta l4proto tcp th sport 9004"));
        let s = table_script("netprobe_1", "udp", 53, None);
        assert_eq!(
            s.matches("meta l4proto udp th dport 53 meta nftrace set 1")
                .count(),
            2
        );
    }
}
