//! The one ruleset change a trace makes: a netprobe-owned nf_tables table (`inet netprobe_<pid>`)
//! whose chains sit at the earliest priority of prerouting and output and set `meta nftrace` on
//! the traced flow only. nf_tables then reports, on the trace netlink group, every rule the
//! flow's packets match in every table — iptables-nft rules included. The table is removed when
//! the trace ends (also on error and Ctrl-C: [`TraceTable`] removes it on drop); tables of a
//! netprobe that was killed are removed at the next start.
//!
//! The agent's armed flows ([`ArmedOp`], `inet netprobe_<pid>_armed`) work the same way for
//! single client flows listed in two sets; the table exists only while a flow is armed, so
//! healthy traffic never passes a netprobe chain. A trace arms the same way the flows whose
//! data segments a rule dropped mid-stream: their retransmits are traced.

use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
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
/// from `addr`, and the ICMP errors about it. TCP: only segments with SYN, FIN or RST are
/// marked, and a data segment (any port) leaves the chain at its first rule, so a healthy
/// transfer on the traced port costs one rule test and no trace message (a data segment dropped
/// by a rule arms its flow instead: see [`ArmedOp`]).
pub fn table_script(name: &str, proto: &str, port: u16, addr: Option<IpAddr>) -> String {
    let mut rules = String::from("tcp flags & (fin | syn | rst) == 0 accept\n");
    rules.push_str(&icmp_error_rules(port));
    rules.push_str(&flow_rules(proto, port, addr));
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

/// ICMP "destination unreachable" (fragmentation needed included) and ICMPv6 "destination
/// unreachable" / "packet too big" quoting a packet from or to `port`: rare packets. The quoted
/// ports sit after the ICMP header (8 bytes) and the quoted IP header (20 bytes without
/// options; IPv6: 40 without extension headers).
fn icmp_error_rules(port: u16) -> String {
    let mut rules = String::new();
    for (at, ty) in [
        (28, "icmp type destination-unreachable"),
        (
            48,
            "icmpv6 type { destination-unreachable, packet-too-big }",
        ),
    ] {
        for port_at in [at, at + 2] {
            rules.push_str(&format!(
                "{ty} @th,{},16 {port} meta nftrace set 1\n",
                port_at * 8
            ));
        }
    }
    rules
}

/// The flow's own packets in both directions (TCP: SYN, FIN, RST).
fn flow_rules(proto: &str, port: u16, addr: Option<IpAddr>) -> String {
    let addr_match = |dir: &str| match addr {
        Some(IpAddr::V4(a)) => format!("ip {dir}addr {a} "),
        Some(IpAddr::V6(a)) => format!("ip6 {dir}addr {a} "),
        None => String::new(),
    };
    let flags = if proto == "tcp" {
        "tcp flags & (fin | syn | rst) != 0 "
    } else {
        ""
    };
    let addr_dirs: &[&str] = if addr.is_some() { &["s", "d"] } else { &[""] };
    let mut rules = String::new();
    for port_dir in ["dport", "sport"] {
        for addr_dir in addr_dirs {
            let a = if addr_dir.is_empty() {
                String::new()
            } else {
                addr_match(addr_dir)
            };
            rules.push_str(&format!(
                "{a}meta l4proto {proto} {flags}th {port_dir} {port} meta nftrace set 1\n"
            ));
        }
    }
    rules
}

/// A trace table installed in one namespace; removed on drop.
pub struct TraceTable {
    netns: NetnsRef,
    name: String,
}

/// Runs an nft script in the calling thread's namespace; `what` names it in the error.
fn run_script(script: &str, what: &str) -> Result<()> {
    let out = nft(script, &["-f", "-"])
        .map_err(|e| Error::io("running nft (is nftables installed?)", e))?;
    if !out.status.success() {
        return Err(Error::io(
            format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()),
            std::io::Error::other("nft failed"),
        ));
    }
    Ok(())
}

impl TraceTable {
    pub fn install(netns: &NetnsRef, proto: &str, port: u16, addr: Option<IpAddr>) -> Result<Self> {
        let name = format!("{NETPROBE_TABLE_PREFIX}{}", std::process::id());
        let script = table_script(&name, proto, port, addr);
        netns.run(|| {
            remove_stale();
            let r = run_script(&script, &format!("installing trace table {name}"));
            if r.is_err() {
                // nft killed after its commit (a terminal's Ctrl-C reaches the whole process
                // group) would leave the table with no owner to remove it.
                let _ = nft("", &["delete", "table", "inet", &name]);
            }
            r
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

/// Suffix of the agent's armed-flows table (`netprobe_<pid>_armed`).
const ARMED_SUFFIX: &str = "_armed";

/// The agent's armed-flows table of this process.
pub fn armed_table_name() -> String {
    format!(
        "{NETPROBE_TABLE_PREFIX}{}{ARMED_SUFFIX}",
        std::process::id()
    )
}

/// The process that owns a netprobe table: `netprobe_<pid>` (a trace) or `netprobe_<pid>_armed`
/// (the agent's armed flows).
pub fn table_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETPROBE_TABLE_PREFIX)?;
    rest.strip_suffix(ARMED_SUFFIX).unwrap_or(rest).parse().ok()
}

/// Removes netprobe tables whose process is gone (a killed trace or agent) from `netns`.
pub fn remove_stale_in(netns: &NetnsRef) -> Result<()> {
    netns.run(remove_stale)
}

/// Removes netprobe tables whose process is gone (a killed trace or agent). Runs in the
/// namespace.
fn remove_stale() {
    let Ok(out) = nft("", &["list", "tables", "inet"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.trim().strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = table_owner(name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nft("", &["delete", "table", "inet", name]);
        }
    }
}

/// One client flow to mark: packets from `addr:port` of protocol `proto` (`tcp`, `udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlow {
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

impl ClientFlow {
    /// `{ addr . proto . port timeout T }`: the element of the set of its address family. The
    /// kernel forgets it after `ttl` even if netprobe does not.
    fn element(&self, ttl: Duration) -> String {
        format!(
            "{{ {} . {} . {} timeout {}ms }}",
            self.addr,
            self.proto,
            self.port,
            ttl.as_millis().max(1)
        )
    }

    fn set(&self) -> &'static str {
        if self.addr.is_ipv4() { "v4" } else { "v6" }
    }
}

/// The armed-flows table with its sets, base chains and first element, replacing any table of
/// the same name: one nft transaction.
/// The chains match the client's source address and port before conntrack and DNAT, so the
/// retransmit of a SYN to a ClusterIP is marked as the client sent it.
pub fn armed_table_script(name: &str, first: &ClientFlow, ttl: Duration) -> String {
    let rules = "    ip saddr . meta l4proto . th sport @v4 meta nftrace set 1\n    \
                 ip6 saddr . meta l4proto . th sport @v6 meta nftrace set 1\n";
    let chain = |n: &str, hook: &str| {
        format!(
            "  chain {n} {{\n    type filter hook {hook} priority {PRIORITY}; policy accept;\n{rules}  }}\n"
        )
    };
    let set = |n: &str, ty: &str| {
        format!(
            "  set {n} {{\n    type {ty} . inet_proto . inet_service\n    flags timeout\n  }}\n"
        )
    };
    // Whatever of ours is there goes first (one transaction): a fresh table, never chains
    // holding their rules twice.
    format!(
        "add table inet {name}\ndelete table inet {name}\ntable inet {name} {{\n{}{}{}{}}}\nadd element inet {name} {} {}\n",
        set("v4", "ipv4_addr"),
        set("v6", "ipv6_addr"),
        chain("pre", "prerouting"),
        chain("out", "output"),
        first.set(),
        first.element(ttl),
    )
}

/// One change of the agent's armed-flows table in a namespace (`inet netprobe_<pid>_armed`).
/// The table is created with the first armed flow and deleted with the last: while nothing is
/// armed, no netprobe chain is hooked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmedOp {
    /// The table, its sets and chains, and the first flow (left-overs of a killed agent go
    /// first).
    Create(ClientFlow),
    /// One more flow.
    Add(ClientFlow),
    /// One flow less; the kernel may have expired it already (not an error).
    Forget(ClientFlow),
    /// The whole table; a namespace that vanished took it along (not an error).
    Remove,
}

impl ArmedOp {
    /// Applies the change in `netns`; `ttl` is how long the kernel keeps an added flow.
    pub fn apply(&self, netns: &NetnsRef, ttl: Duration) -> Result<()> {
        let name = armed_table_name();
        match self {
            Self::Create(first) => {
                let script = armed_table_script(&name, first, ttl);
                netns.run(|| {
                    remove_stale();
                    run_script(&script, &format!("installing armed-flows table {name}"))
                })?
            }
            Self::Add(flow) => {
                let script = format!(
                    "add element inet {name} {} {}\n",
                    flow.set(),
                    flow.element(ttl)
                );
                netns.run(|| run_script(&script, &format!("arming a flow in {name}")))?
            }
            Self::Forget(flow) => {
                let elem = format!("{{ {} . {} . {} }}", flow.addr, flow.proto, flow.port);
                let script = format!("delete element inet {name} {} {elem}\n", flow.set());
                let _ = netns.run(|| nft(&script, &["-f", "-"]));
                Ok(())
            }
            Self::Remove => {
                let _ = netns.run(|| nft("", &["delete", "table", "inet", &name]));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_and_armed_tables_name_their_process() {
        assert_eq!(table_owner("netprobe_42"), Some(42));
        assert_eq!(table_owner("netprobe_42_armed"), Some(42));
        assert_eq!(table_owner("netprobe_x"), None);
        assert_eq!(table_owner("netprobe_42_other"), None);
        assert_eq!(table_owner("filter"), None);
        assert!(armed_table_name().ends_with("_armed"));
        assert_eq!(table_owner(&armed_table_name()), Some(std::process::id()));
    }

    #[test]
    fn armed_script_matches_the_client_before_dnat_in_both_families() {
        let flow = ClientFlow {
            proto: "tcp",
            addr: "10.42.0.20".parse().unwrap(),
            port: 40000,
        };
        let s = armed_table_script("netprobe_1_armed", &flow, Duration::from_secs(5));
        assert!(s.contains("hook prerouting priority -2147483648"));
        assert!(s.contains("hook output priority -2147483648"));
        assert!(s.starts_with(
            "add table inet netprobe_1_armed\ndelete table inet netprobe_1_armed\ntable inet"
        ));
        assert!(s.contains("type ipv4_addr . inet_proto . inet_service"));
        assert!(s.contains("type ipv6_addr . inet_proto . inet_service"));
        assert_eq!(
            s.matches("ip saddr . meta l4proto . th sport @v4 meta nftrace set 1")
                .count(),
            2
        );
        assert!(s.ends_with(
            "add element inet netprobe_1_armed v4 { 10.42.0.20 . tcp . 40000 timeout 5000ms }\n"
        ));
    }

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
        // TCP: only SYN, FIN and RST are traced, never a data segment (#18: no per-packet cost).
        let syn_fin_rst = "meta l4proto tcp tcp flags & (fin | syn | rst) != 0";
        assert!(s.contains(&format!(
            "ip daddr 10.43.51.131 {syn_fin_rst} th dport 9004"
        )));
        assert!(s.contains(&format!(
            "ip saddr 10.43.51.131 {syn_fin_rst} th sport 9004"
        )));
        let s = table_script("netprobe_1", "udp", 53, None);
        assert_eq!(
            s.matches("meta l4proto udp th dport 53 meta nftrace set 1")
                .count(),
            2
        );
    }

    #[test]
    fn a_data_segment_leaves_at_the_first_rule_and_icmp_errors_about_the_port_are_marked() {
        let s = table_script("netprobe_1", "tcp", 9500, None);
        for chain in s.split("chain ").skip(1) {
            let rules: Vec<&str> = chain.lines().skip(2).map(str::trim).collect();
            assert_eq!(rules[0], "tcp flags & (fin | syn | rst) == 0 accept", "{s}");
            // ICMP: the quoted source port, then the quoted destination port.
            assert_eq!(
                rules[1],
                "icmp type destination-unreachable @th,224,16 9500 meta nftrace set 1"
            );
            assert_eq!(
                rules[2],
                "icmp type destination-unreachable @th,240,16 9500 meta nftrace set 1"
            );
            assert_eq!(
                rules[3],
                "icmpv6 type { destination-unreachable, packet-too-big } @th,384,16 9500 meta nftrace set 1"
            );
            assert!(rules[4].ends_with("@th,400,16 9500 meta nftrace set 1"));
            assert!(rules[5].contains("th dport 9500"));
        }
    }
}
