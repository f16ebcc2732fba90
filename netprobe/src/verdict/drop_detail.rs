//! Kernel drops whose cause the node showed at the drop (see `model::drops`): the tc program
//! that returned drop, and reverse-path filtering with the route back to the source. Each says
//! the cause in the headline, the fact to check in the explanation, and commands to run in the
//! namespace of the interface.

use super::ns_name;
use crate::{
    events::{DropInfo, Event},
    model::{RpFilter, TcProgram},
};

/// The headline, when the drop names its cause better than "dropped by the kernel".
pub fn headline(info: &DropInfo) -> Option<String> {
    if let [p] = info.tc_programs.as_slice() {
        let owner = p
            .owner
            .as_deref()
            .map(|o| format!(" ({o})"))
            .unwrap_or_default();
        Some(format!("dropped by tc program {}{owner}", p.name))
    } else if !info.tc_programs.is_empty() {
        Some("dropped by a tc program".into())
    } else if info.rp_filter.is_some() {
        Some("dropped by reverse-path filtering (rp_filter)".into())
    } else {
        None
    }
}

/// The explanation of a drop `d` of the `what` (SYN, datagram) with a known cause, and its
/// next steps; None when the drop carries none.
pub fn explain(d: &Event, what: &str, next_steps: &mut Vec<String>) -> Option<String> {
    let info = d.drop.as_ref()?;
    let iface = d
        .interface
        .as_ref()
        .map(|i| i.name.clone().unwrap_or_else(|| i.ifindex.to_string()))
        .unwrap_or_else(|| "the interface".into());
    let ns = ns_name(d);
    let run_in = command_prefix(ns.as_deref());
    let in_ns = ns.as_ref().map(|n| format!(" in {n}")).unwrap_or_default();
    if !info.tc_programs.is_empty() {
        let why = tc_sentence(&info.tc_programs, &format!("{iface}{in_ns}"), what);
        next_steps.extend(tc_next_steps(&info.tc_programs, &iface, &run_in));
        return Some(format!("{why} ({}).", info.reason));
    }
    let rp = info.rp_filter.as_ref()?;
    next_steps.extend(rp_next_steps(rp, d.src, &run_in));
    Some(format!(
        "Reverse-path filtering dropped the {what} on {iface}{in_ns} ({}). {}",
        info.reason,
        rp_sentence(rp, d.src, ns.as_deref())
    ))
}

/// `ip netns exec NAME ` for a named namespace, `nsenter` for a process's, nothing for the one
/// netprobe runs in (or one it cannot name).
fn command_prefix(ns: Option<&str>) -> String {
    match ns {
        Some(n) if n.starts_with("pid:") => {
            format!("nsenter --net=/proc/{}/ns/net ", &n[4..])
        }
        Some(n) if !n.starts_with('(') && !n.bytes().all(|b| b.is_ascii_digit()) => {
            format!("ip netns exec {n} ")
        }
        _ => String::new(),
    }
}

fn tc_sentence(progs: &[TcProgram], place: &str, what: &str) -> String {
    let hook = &progs[0].hook;
    let mut why = if let [p] = progs {
        format!(
            "The tc program {} on {hook} of {place} dropped the {what}",
            p.describe()
        )
    } else {
        let all: Vec<String> = progs.iter().map(TcProgram::describe).collect();
        format!(
            "One of the tc programs on {hook} of {place} dropped the {what}; they run in this order (tcx before clsact): {}",
            all.join(", ")
        )
    };
    for owner in owners(progs) {
        why.push_str(match owner {
            "Calico" => " — Calico's eBPF dataplane: a Calico or Kubernetes network policy (or Calico's own checks) denied the packet",
            _ => " — Cilium's datapath: a network policy (or Cilium's own checks) denied the packet",
        });
    }
    why
}

fn owners(progs: &[TcProgram]) -> Vec<&str> {
    let mut o: Vec<&str> = progs.iter().filter_map(|p| p.owner.as_deref()).collect();
    o.dedup();
    o
}

fn tc_next_steps(progs: &[TcProgram], iface: &str, run_in: &str) -> Vec<String> {
    let mut next: Vec<String> = progs
        .iter()
        .map(|p| format!("bpftool prog show id {}", p.id))
        .collect();
    next.push(format!("{run_in}bpftool net show dev {iface}"));
    for owner in owners(progs) {
        next.push(match owner {
            "Calico" => format!(
                "in this node's calico-node pod: calico-node -bpf policy dump {iface} all (the policy on this interface); kubectl get networkpolicy -A"
            ),
            _ => "in this node's cilium pod: cilium-dbg monitor --type drop (the drop reason), cilium-dbg policy get".into(),
        });
    }
    next
}

fn rp_mode(v: u8) -> &'static str {
    match v {
        0 => "off",
        1 => "strict",
        _ => "loose",
    }
}

/// `ns`: the namespace of the interface, when known.
fn rp_sentence(rp: &RpFilter, src: std::net::IpAddr, ns: Option<&str>) -> String {
    let iface = &rp.interface;
    let back = match &rp.route_back {
        Some(dev) if dev == iface => format!("routes {src} back through {iface} itself"),
        Some(dev) => format!("routes {src} back through {dev}, not {iface}"),
        None => format!("has no route back to {src}"),
    };
    format!(
        "rp_filter is {} on {iface} (net.ipv4.conf.all.rp_filter={}, net.ipv4.conf.{iface}.rp_filter={}; the higher applies), and {} {back}.",
        rp_mode(rp.effective()),
        rp.all,
        rp.iface,
        ns.unwrap_or("its namespace")
    )
}

fn rp_next_steps(rp: &RpFilter, src: std::net::IpAddr, run_in: &str) -> Vec<String> {
    let iface = &rp.interface;
    vec![
        format!("{run_in}sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{iface}.rp_filter"),
        format!("{run_in}ip route get {src}"),
        format!(
            "send from an address routed back through {iface} (the pod's own IP), route {src} back through {iface}, or set rp_filter to 2 (loose) on {iface} (and on all if it is 1)"
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calico() -> TcProgram {
        TcProgram {
            name: "cali_tc_drop".into(),
            id: 812,
            tag: "3b185187f1855c4c".into(),
            mode: "clsact".into(),
            hook: "egress".into(),
            owner: Some("Calico".into()),
        }
    }

    #[test]
    fn a_tc_drop_names_the_program_and_its_owner() {
        let info = DropInfo {
            reason: "TC_EGRESS".into(),
            tc_programs: vec![calico()],
            ..Default::default()
        };
        assert_eq!(
            headline(&info).unwrap(),
            "dropped by tc program cali_tc_drop (Calico)"
        );
        let why = tc_sentence(&info.tc_programs, "cali12 in node", "SYN");
        assert!(
            why.starts_with("The tc program cali_tc_drop (id 812, tag 3b185187f1855c4c, clsact egress, Calico) on egress of cali12 in node dropped the SYN — Calico's eBPF dataplane"),
            "{why}"
        );
        let next = tc_next_steps(&info.tc_programs, "cali12", "ip netns exec node ");
        assert_eq!(next[0], "bpftool prog show id 812");
        assert_eq!(next[1], "ip netns exec node bpftool net show dev cali12");
        assert!(next[2].contains("calico-node -bpf policy dump cali12 all"));
    }

    #[test]
    fn an_rp_filter_drop_says_the_mode_that_applies_and_the_route_back() {
        let rp = RpFilter {
            interface: "cali12".into(),
            all: 0,
            iface: 1,
            route_back: Some("eth1".into()),
        };
        let src = "10.42.9.9".parse().unwrap();
        assert_eq!(
            rp_sentence(&rp, src, Some("node")),
            "rp_filter is strict on cali12 (net.ipv4.conf.all.rp_filter=0, net.ipv4.conf.cali12.rp_filter=1; the higher applies), and node routes 10.42.9.9 back through eth1, not cali12."
        );
        assert_eq!(
            rp_next_steps(&rp, src, "")[..2],
            [
                "sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.cali12.rp_filter",
                "ip route get 10.42.9.9"
            ]
        );
        assert_eq!(
            command_prefix(Some("pid:42")),
            "nsenter --net=/proc/42/ns/net "
        );
        assert_eq!(command_prefix(Some("(current)")), "");
        assert_eq!(command_prefix(Some("4026532315")), "");
    }
}
