//! Netfilter attribution: from an nftables trace (the rules a packet matched, in order) to the
//! rule that dropped or rejected it, the chain path that led there, what the client therefore
//! sees, and the object behind the rule.

pub mod counters;
pub mod legacy;
pub mod ruleset;

use std::{
    collections::{HashMap, VecDeque},
    process::Command,
};

use crate::model::{Backend, NfAction, OwnerSystem};

use crate::attribution::cni;
pub use crate::attribution::{Evidence, Netfilter, Owner, Step};
use crate::netlink::nftrace::{TraceMsg, TraceType, Verdict};
pub use ruleset::{RuleRef, Ruleset};

/// Reject flavours and what the peer application sees.
fn reject_effect(text: &str) -> Option<&'static str> {
    let t = text.to_lowercase();
    if !(t.contains("-j reject") || t.split_whitespace().any(|w| w == "reject")) {
        return None;
    }
    if t.contains("host-prohib")
        || t.contains("admin-prohib")
        || t.contains("net-prohib")
        || t.contains("host-unreach")
        || t.contains("net-unreach")
    {
        Some("no route to host")
    } else {
        // icmp(6) port-unreachable (the default) and tcp-reset both end in ECONNREFUSED.
        Some("connection refused")
    }
}

/// Builds the attribution of a packet whose trace ended in a drop.
pub fn attribute(path: &[TraceMsg], rs: &Ruleset) -> Option<Netfilter> {
    let last = path.last()?;
    if last.verdict != Some(Verdict::Drop) {
        return None;
    }
    let family = nfproto_name(last.table_family);
    let rule = last
        .handle
        .and_then(|h| rs.rule(&family, &last.table, &last.chain, h));
    let text = rule.as_ref().map(|r| r.text.clone());
    let reject = text.as_deref().and_then(reject_effect);
    // The first step in this table is in its base chain: that chain's hook is where we are.
    let hook = path
        .iter()
        .filter(|m| m.table == last.table && m.table_family == last.table_family)
        .find_map(|m| {
            rs.chain(&family, &m.table, &m.chain)
                .and_then(|c| c.hook.clone())
        });
    let dst = path_tuple(path).map(|(_, _, d, p)| (d, p));
    let owner = match &rule {
        Some(r) => cni::owner_of(rs, r, dst),
        None => Owner::new(
            OwnerSystem::User,
            if last.kind == TraceType::Policy {
                "chain-policy-drop"
            } else {
                "unknown-rule"
            },
            format!(
                "The policy of chain {} {} {} is drop",
                family, last.table, last.chain
            ),
        ),
    };
    let steps = path
        .iter()
        .filter(|m| !m.table.starts_with(NETPROBE_TABLE_PREFIX))
        .map(|m| Step {
            table: format!("{} {}", nfproto_name(m.table_family), m.table),
            chain: m.chain.clone(),
            handle: m.handle,
            rule: m
                .handle
                .and_then(|h| rs.rule(&nfproto_name(m.table_family), &m.table, &m.chain, h))
                .map(|r| r.text),
            verdict: match m.kind {
                TraceType::Policy => format!(
                    "policy {}",
                    m.verdict.as_ref().map(Verdict::name).unwrap_or_default()
                ),
                TraceType::Return => "return".into(),
                _ => m
                    .verdict
                    .as_ref()
                    .map(Verdict::name)
                    .unwrap_or_else(|| "continue".into()),
            },
        })
        .collect();
    let iptables_nft = rs
        .table(&family, &last.table)
        .is_some_and(|t| t.iptables_nft)
        || rs.has_iptables_table(&family, &last.table);
    Some(Netfilter {
        backend: if iptables_nft {
            Backend::IptablesNft
        } else {
            Backend::Nftables
        },
        family,
        hook,
        table: last.table.clone(),
        chain: last.chain.clone(),
        handle: last.handle,
        position: rule.as_ref().and_then(|r| r.position),
        rule: text,
        comments: rule.map(|r| r.comments).unwrap_or_default(),
        action: if reject.is_some() {
            NfAction::Reject
        } else {
            NfAction::Drop
        },
        client_sees: reject.unwrap_or("timeout").into(),
        path: steps,
        owner,
        evidence: Evidence::Trace,
    })
}

/// Attribution of a drop from the rules whose counters moved (iptables-legacy: see [`legacy`];
/// nf_tables: see [`counters`]); the first rule is taken as the one that fired, the others are
/// named in the explanation. No trace, so no path.
pub fn attribute_counted(
    fired: &[RuleRef],
    rs: &Ruleset,
    dst: Option<(std::net::IpAddr, u16)>,
) -> Option<Netfilter> {
    let rule = fired.first()?;
    let reject = reject_effect(&rule.text);
    let mut owner = cni::owner_of(rs, rule, dst);
    if fired.len() > 1 {
        let others: Vec<String> = fired[1..]
            .iter()
            .map(|r| format!("{} {} #{}", r.table, r.chain, r.position.unwrap_or(0)))
            .collect();
        owner.add_note(&format!(
            " (other rules whose counters also moved meanwhile: {})",
            others.join(", ")
        ));
    }
    // Legacy rules have no nf_tables handle (see legacy::fired).
    let legacy = rule.handle == 0;
    let backend = if legacy {
        Backend::IptablesLegacy
    } else if rs
        .table(&rule.family, &rule.table)
        .is_some_and(|t| t.iptables_nft)
        || rs.has_iptables_table(&rule.family, &rule.table)
    {
        Backend::IptablesNft
    } else {
        Backend::Nftables
    };
    Some(Netfilter {
        backend,
        family: rule.family.clone(),
        hook: hook_of(rs, rule, legacy),
        table: rule.table.clone(),
        chain: rule.chain.clone(),
        handle: (!legacy).then_some(rule.handle),
        position: rule.position,
        rule: Some(rule.text.clone()),
        comments: rule.comments.clone(),
        action: if reject.is_some() {
            NfAction::Reject
        } else {
            NfAction::Drop
        },
        client_sees: reject.unwrap_or("timeout").into(),
        path: Vec::new(),
        owner,
        evidence: Evidence::Counters,
    })
}

/// The hook of a counted rule's chain when it is a base chain (a jump target's hook is not
/// known without a path).
fn hook_of(rs: &Ruleset, rule: &RuleRef, legacy: bool) -> Option<String> {
    if legacy {
        let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
        return builtin
            .contains(&rule.chain.as_str())
            .then(|| rule.chain.to_lowercase());
    }
    rs.chain(&rule.family, &rule.table, &rule.chain)
        .and_then(|c| c.hook.clone())
}

/// The packet's addresses: nf_tables includes the headers only in the first message per hook.
pub fn path_tuple(path: &[TraceMsg]) -> Option<(std::net::IpAddr, u16, std::net::IpAddr, u16)> {
    path.iter().rev().find_map(|m| m.tuple)
}

/// `NFPROTO_*` → nft family keyword.
pub fn nfproto_name(p: u8) -> String {
    match p {
        1 => "inet".into(),
        2 => "ip".into(),
        3 => "arp".into(),
        5 => "netdev".into(),
        7 => "bridge".into(),
        10 => "ip6".into(),
        o => format!("family-{o}"),
    }
}

/// Tables netprobe installs are named `netprobe_<pid>`.
pub const NETPROBE_TABLE_PREFIX: &str = "netprobe_";

/// Collects trace messages per packet (trace id) and yields the attribution when a packet is dropped.
#[derive(Default)]
pub struct PathCollector {
    paths: HashMap<u32, Vec<TraceMsg>>,
    order: VecDeque<u32>,
}

/// Packets whose trace is still open; older ones (accepted long ago) are forgotten.
const MAX_OPEN_TRACES: usize = 4096;

impl PathCollector {
    /// Adds a message; returns the whole path when it ends in a drop.
    pub fn push(&mut self, m: TraceMsg) -> Option<Vec<TraceMsg>> {
        let id = m.id;
        let drop = m.verdict == Some(Verdict::Drop);
        if !self.paths.contains_key(&id) {
            self.order.push_back(id);
            if self.order.len() > MAX_OPEN_TRACES
                && let Some(old) = self.order.pop_front()
            {
                self.paths.remove(&old);
            }
        }
        self.paths.entry(id).or_default().push(m);
        if drop {
            self.order.retain(|i| *i != id);
            return self.paths.remove(&id);
        }
        None
    }
}

/// Reads the ruleset of the calling thread's namespace (run it inside `NetnsRef::run`).
/// Tools that are missing contribute nothing: a node without iptables-nft has no such tables.
pub fn fetch_ruleset() -> Ruleset {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let nft = out("nft", &["-a", "list", "ruleset"]);
    let v4 = out("iptables-nft-save", &[]);
    let v6 = out("ip6tables-nft-save", &[]);
    let mut rs = Ruleset::from_outputs(&nft, &v4, &v6);
    rs.legacy_rules = ["iptables-legacy-save", "ip6tables-legacy-save"]
        .iter()
        .map(|cmd| {
            out(cmd, &[])
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        })
        .sum();
    rs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u32, table: &str, chain: &str, handle: Option<u64>, verdict: Verdict) -> TraceMsg {
        TraceMsg {
            id,
            table_family: 2,
            nfproto: 2,
            table: table.into(),
            chain: chain.into(),
            handle,
            kind: if handle.is_some() {
                TraceType::Rule
            } else {
                TraceType::Policy
            },
            verdict: Some(verdict),
            policy: None,
            iif: None,
            oif: None,
            tuple: Some((
                "10.42.0.20".parse().unwrap(),
                40000,
                "10.42.0.30".parse().unwrap(),
                9004,
            )),
            l4proto: Some(6),
        }
    }

    /// A Calico-shaped iptables-nft filter table, as `nft -a list ruleset` and `iptables-save` print it.
    const NFT: &str = "table ip filter { # handle 1
	chain FORWARD { # handle 1
		type filter hook forward priority filter; policy accept;
		counter packets 0 bytes 0 jump cali-FORWARD # handle 10
	}
	chain cali-FORWARD { # handle 2
		counter packets 0 bytes 0 jump cali-to-wl-dispatch # handle 11
	}
	chain cali-to-wl-dispatch { # handle 3
		oifname \"cali0123456789a\" counter packets 0 bytes 0 goto cali-tw-cali0123456789a # handle 12
		counter packets 0 bytes 0 drop # handle 13
	}
	chain cali-tw-cali0123456789a { # handle 4
		ct state related,established counter packets 0 bytes 0 accept # handle 14
		ct state invalid counter packets 0 bytes 0 drop # handle 15
		counter packets 0 bytes 0 meta mark set mark and 0xfffdffff # handle 16
		counter packets 0 bytes 0 jump cali-pi-_Lc1X7Z1pBVYp # handle 17
		meta mark & 0x00020000 == 0x00020000 counter packets 0 bytes 0 return # handle 18
		meta mark & 0x00020000 == 0x00000000 counter packets 0 bytes 0 drop # handle 19
	}
	chain cali-pi-_Lc1X7Z1pBVYp { # handle 5
		counter packets 0 bytes 0 # handle 20
		tcp dport 9005 counter packets 0 bytes 0 meta mark set mark or 0x20000 # handle 21
	}
}
# Warning: table ip filter is managed by iptables-nft, do not touch!
";
    const SAVE: &str = "*filter
:FORWARD ACCEPT [0:0]
:cali-FORWARD - [0:0]
:cali-pi-_Lc1X7Z1pBVYp - [0:0]
:cali-to-wl-dispatch - [0:0]
:cali-tw-cali0123456789a - [0:0]
-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD
-A cali-FORWARD -m comment --comment \"cali:vjrMJCRpqwy5oRoX\" -j cali-to-wl-dispatch
-A cali-to-wl-dispatch -o cali0123456789a -m comment --comment \"cali:aaa\" -g cali-tw-cali0123456789a
-A cali-to-wl-dispatch -m comment --comment \"cali:bbb\" -m comment --comment \"Unknown interface\" -j DROP
-A cali-tw-cali0123456789a -m comment --comment \"cali:c1\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-tw-cali0123456789a -m comment --comment \"cali:c2\" -m conntrack --ctstate INVALID -j DROP
-A cali-tw-cali0123456789a -m comment --comment \"cali:c3\" -j MARK --set-xmark 0x0/0x20000
-A cali-tw-cali0123456789a -m comment --comment \"cali:c4\" -j cali-pi-_Lc1X7Z1pBVYp
-A cali-tw-cali0123456789a -m comment --comment \"cali:c5\" -m comment --comment \"Return if policy accepted\" -m mark --mark 0x20000/0x20000 -j RETURN
-A cali-tw-cali0123456789a -m comment --comment \"cali:c6\" -m comment --comment \"Drop if no policies passed packet\" -m mark --mark 0x0/0x20000 -j DROP
-A cali-pi-_Lc1X7Z1pBVYp -m comment --comment \"cali:p1\" -m comment --comment \"Policy financial-inference/knp.default.scheduler-allow-xds ingress\"
-A cali-pi-_Lc1X7Z1pBVYp -p tcp -m comment --comment \"cali:p2\" -m tcp --dport 9005 -j MARK --set-xmark 0x20000/0x20000
COMMIT
";

    #[test]
    fn calico_end_of_tier_deny_names_chain_rule_and_policy() {
        let rs = Ruleset::from_outputs(NFT, SAVE, "");
        let mut c = PathCollector::default();
        assert!(
            c.push(msg(
                7,
                "filter",
                "FORWARD",
                Some(10),
                Verdict::Jump("cali-FORWARD".into())
            ))
            .is_none()
        );
        assert!(
            c.push(msg(
                7,
                "filter",
                "cali-FORWARD",
                Some(11),
                Verdict::Jump("cali-to-wl-dispatch".into())
            ))
            .is_none()
        );
        assert!(
            c.push(msg(
                7,
                "filter",
                "cali-to-wl-dispatch",
                Some(12),
                Verdict::Goto("cali-tw-cali0123456789a".into())
            ))
            .is_none()
        );
        assert!(
            c.push(msg(
                7,
                "filter",
                "cali-tw-cali0123456789a",
                Some(16),
                Verdict::Continue
            ))
            .is_none()
        );
        assert!(
            c.push(msg(
                7,
                "filter",
                "cali-tw-cali0123456789a",
                Some(17),
                Verdict::Jump("cali-pi-_Lc1X7Z1pBVYp".into())
            ))
            .is_none()
        );
        let path = c
            .push(msg(
                7,
                "filter",
                "cali-tw-cali0123456789a",
                Some(19),
                Verdict::Drop,
            ))
            .expect("drop ends the path");
        let nf = attribute(&path, &rs).unwrap();
        assert_eq!(nf.backend, Backend::IptablesNft);
        assert_eq!(nf.hook.as_deref(), Some("forward"));
        assert_eq!(nf.chain, "cali-tw-cali0123456789a");
        assert_eq!(nf.position, Some(6));
        assert!(
            nf.comments
                .contains(&"Drop if no policies passed packet".to_string())
        );
        assert_eq!(nf.action, NfAction::Drop);
        assert_eq!(nf.client_sees, "timeout");
        assert_eq!(nf.owner.kind, "calico-end-of-tier-deny");
        assert_eq!(
            nf.owner.policies,
            vec!["financial-inference/scheduler-allow-xds"]
        );
        assert_eq!(nf.owner.interface.as_deref(), Some("cali0123456789a"));
        assert_eq!(nf.path.len(), 6);
        assert_eq!(nf.path[2].verdict, "goto cali-tw-cali0123456789a");
    }

    #[test]
    fn reject_means_refused_and_accepts_are_not_attributed() {
        assert_eq!(
            reject_effect("-A KUBE-SERVICES -j REJECT --reject-with icmp-port-unreachable"),
            Some("connection refused")
        );
        assert_eq!(
            reject_effect("-A X -j REJECT --reject-with icmp-host-prohibited"),
            Some("no route to host")
        );
        assert_eq!(reject_effect("reject"), Some("connection refused"));
        assert_eq!(reject_effect("-A X -j DROP"), None);
        let mut c = PathCollector::default();
        assert!(
            c.push(msg(1, "filter", "FORWARD", None, Verdict::Accept))
                .is_none()
        );
    }
}
