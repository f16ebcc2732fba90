//! Attribution by counter difference for nf_tables rules (iptables-nft rules always count:
//! `counter packets N bytes M`). For what a trace cannot see because it is never sent again: a
//! REJECT, or a drop the client does not retry. The rules whose packet counters moved between
//! two reads of `nft -a list ruleset`, and that drop or reject, are the ones that fired. Exact
//! on a quiet namespace; on a busy one the rule naming the packet's destination is preferred.

use std::{collections::HashMap, net::IpAddr};

use super::ruleset::{RuleRef, Ruleset, Table};

/// (family, table, chain, handle) → packets, for the rules that have a counter.
pub type NftCounters = HashMap<(String, String, String, u64), u64>;

/// The `packets N` of an nft rule's `counter` statement.
fn packets(rule: &str) -> Option<u64> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "counter" && words.next() == Some("packets") {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The counters of the parsed `nft -a list ruleset` tables.
pub fn nft_counters(tables: &HashMap<(String, String), Table>) -> NftCounters {
    let mut out = NftCounters::new();
    for ((family, table), t) in tables {
        for (chain, c) in &t.chains {
            for (handle, text) in &c.rules {
                if let Some(n) = packets(text) {
                    out.insert((family.clone(), table.clone(), chain.clone(), *handle), n);
                }
            }
        }
    }
    out
}

/// A rule's text without its comments (a comment may say "drop").
fn without_comments(rule: &str) -> String {
    let mut out = String::new();
    let mut rest = rule;
    while let Some(i) = rest.find("comment \"") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "comment \"".len()..];
        let end = after.find('"').map_or(after.len(), |e| e + 1);
        rest = &after[end.min(after.len())..];
    }
    out.push_str(rest);
    out
}

/// Whether a rule ends a packet: `-j DROP`/`-j REJECT` (iptables-save form) or an nft `drop`
/// or `reject` statement.
pub fn drops_or_rejects(rule: &str) -> bool {
    if rule.starts_with("-A ") {
        return rule.contains("-j DROP") || rule.contains("-j REJECT");
    }
    without_comments(rule)
        .split_whitespace()
        .any(|w| w == "drop" || w == "reject" || w == "\"REJECT\"")
}

/// Handles of the dropping rules whose counters increased between `before` and `after`.
pub fn moved(before: &NftCounters, after: &NftCounters) -> Vec<(String, String, String, u64)> {
    let mut out: Vec<_> = after
        .iter()
        .filter(|(k, n)| **n > before.get(*k).copied().unwrap_or(0))
        .map(|(k, _)| k.clone())
        .collect();
    out.sort();
    out
}

/// The dropping rules among `moved` handles, as `rs` names them; `None` when a handle is not in
/// `rs` (the ruleset changed since it was read: read it again).
pub fn fired(moved: &[(String, String, String, u64)], rs: &Ruleset) -> Option<Vec<RuleRef>> {
    let mut out = Vec::new();
    for (family, table, chain, handle) in moved {
        let r = rs.rule(family, table, chain, *handle)?;
        if drops_or_rejects(&r.text) {
            out.push(r);
        }
    }
    Some(out)
}

/// Puts first the rule that names the packet's destination (address and port, else address),
/// so the attribution follows this packet on a namespace where other drops happen meanwhile.
pub fn prefer_destination(fired: &mut [RuleRef], dst: Option<(IpAddr, u16)>) {
    let Some((addr, port)) = dst else { return };
    let (a, p) = (addr.to_string(), port.to_string());
    let score = |r: &RuleRef| {
        let words: Vec<&str> = r
            .text
            .split(|c: char| c.is_whitespace() || c == '/' || c == ',')
            .collect();
        let has_addr = words.contains(&a.as_str());
        let has_port = words.contains(&p.as_str());
        match (has_addr, has_port) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        }
    };
    fired.sort_by_key(score);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::rules::ruleset::parse_nft;

    fn ruleset(pkts: u64) -> String {
        format!(
            "table ip filter {{ # handle 1
	chain FORWARD {{ # handle 1
		type filter hook forward priority filter; policy accept;
		ct state new counter packets 9 bytes 540 jump KUBE-SERVICES # handle 4
	}}
	chain KUBE-SERVICES {{ # handle 2
		ip daddr 10.43.51.131 tcp dport 9004 counter packets {pkts} bytes 0 reject # handle 5
		ip daddr 10.43.7.7 tcp dport 80 counter packets 3 bytes 0 reject # handle 6
		counter packets {pkts} bytes 0 accept comment \"drop nothing\" # handle 7
	}}
}}
# Warning: table ip filter is managed by iptables-nft, do not touch!
"
        )
    }

    const SAVE: &str = "*filter
:FORWARD ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.43.51.131/32 -p tcp -m comment --comment \"financial-inference/seldon-scheduler:xds has no endpoints\" -m tcp --dport 9004 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-SERVICES -d 10.43.7.7/32 -p tcp -m comment --comment \"other/svc:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-SERVICES -m comment --comment \"drop nothing\" -j ACCEPT
COMMIT
";

    #[test]
    fn the_dropping_rule_whose_counter_moved_fired() {
        let before = nft_counters(&parse_nft(&ruleset(0)));
        let after_text = ruleset(1);
        let after = nft_counters(&parse_nft(&after_text));
        assert_eq!(before.len(), 4);
        let m = moved(&before, &after);
        assert_eq!(m.len(), 2, "the reject and the accept moved: {m:?}");
        let rs = Ruleset::from_outputs(&after_text, SAVE, "");
        let f = fired(&m, &rs).unwrap();
        assert_eq!(f.len(), 1, "accepts are not drops");
        assert_eq!(f[0].chain, "KUBE-SERVICES");
        assert_eq!(f[0].position, Some(1));
        assert_eq!(
            f[0].comments,
            vec!["financial-inference/seldon-scheduler:xds has no endpoints"]
        );
        assert!(moved(&after, &after).is_empty());
        let unknown = vec![("ip".into(), "filter".into(), "KUBE-SERVICES".into(), 99)];
        assert!(
            fired(&unknown, &rs).is_none(),
            "a rule added since: read again"
        );
    }

    #[test]
    fn the_rule_naming_the_destination_comes_first() {
        let rs = Ruleset::from_outputs(&ruleset(1), SAVE, "");
        let mut f = vec![
            rs.rule("ip", "filter", "KUBE-SERVICES", 6).unwrap(),
            rs.rule("ip", "filter", "KUBE-SERVICES", 5).unwrap(),
        ];
        prefer_destination(&mut f, Some(("10.43.51.131".parse().unwrap(), 9004)));
        assert_eq!(f[0].handle, 5);
        prefer_destination(&mut f, Some(("10.43.7.7".parse().unwrap(), 80)));
        assert_eq!(f[0].handle, 6);
    }

    #[test]
    fn drop_and_reject_statements_not_comments() {
        assert!(drops_or_rejects("counter packets 1 bytes 60 drop"));
        assert!(drops_or_rejects(
            "tcp dport 9 counter packets 0 bytes 0 reject with icmp port-unreachable"
        ));
        assert!(drops_or_rejects(
            "-A X -p tcp -j REJECT --reject-with tcp-reset"
        ));
        assert!(!drops_or_rejects(
            "counter packets 1 bytes 60 accept comment \"drop if x\""
        ));
        assert!(!drops_or_rejects(
            "-A X -m comment --comment \"drop\" -j ACCEPT"
        ));
        assert_eq!(
            packets("ct state new counter packets 12 bytes 3 jump X"),
            Some(12)
        );
        assert_eq!(packets("jump X"), None);
    }
}
