//! iptables-legacy (x_tables) has no nftables trace. netprobe attributes its drops by counter
//! difference: a snapshot of `iptables-legacy-save -c` when the trace starts, another when the
//! kernel reports a drop inside x_tables (`kfree_skb` at `nf_hook_slow`), and the DROP/REJECT rules
//! whose packet counters moved in between are the ones that fired. Exact on a quiet node; on a
//! busy one every candidate is listed.

use std::collections::HashMap;

use super::ruleset::{RuleRef, comments};

/// (family, table, chain, 1-based position) → (packets, rule line).
pub type Counters = HashMap<(String, String, String, usize), (u64, String)>;

/// Parses `iptables-legacy-save -c` (`[pkts:bytes] -A CHAIN …` lines).
pub fn parse_counters(family: &str, text: &str) -> Counters {
    let mut out = Counters::new();
    let mut table = String::new();
    let mut pos: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            pos.clear();
            continue;
        }
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counts, rule)) = rest.split_once("] ") else {
            continue;
        };
        let Some(chain) = rule
            .strip_prefix("-A ")
            .and_then(|r| r.split_whitespace().next())
        else {
            continue;
        };
        let pkts = counts
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let p = pos.entry(chain.to_string()).or_default();
        *p += 1;
        out.insert(
            (family.into(), table.clone(), chain.to_string(), *p),
            (pkts, rule.to_string()),
        );
    }
    out
}

fn is_terminal_drop(rule: &str) -> bool {
    rule.contains("-j DROP") || rule.contains("-j REJECT")
}

/// DROP/REJECT rules whose counters increased between two snapshots, in a stable order.
pub fn fired(before: &Counters, after: &Counters) -> Vec<RuleRef> {
    let mut out: Vec<RuleRef> = after
        .iter()
        .filter(|(k, (n, rule))| {
            is_terminal_drop(rule) && *n > before.get(*k).map_or(0, |(b, _)| *b)
        })
        .map(|((family, table, chain, pos), (_, rule))| RuleRef {
            family: family.clone(),
            table: table.clone(),
            chain: chain.clone(),
            handle: 0,
            position: Some(*pos),
            text: rule.clone(),
            nft_text: None,
            comments: comments(rule),
        })
        .collect();
    out.sort_by(|a, b| (&a.table, &a.chain, a.position).cmp(&(&b.table, &b.chain, b.position)));
    out
}

/// Reads both legacy families' counters in the calling thread's namespace.
pub fn snapshot() -> Counters {
    let mut all = Counters::new();
    for (family, cmd) in [
        ("ip", "iptables-legacy-save"),
        ("ip6", "ip6tables-legacy-save"),
    ] {
        if let Ok(o) = std::process::Command::new(cmd).arg("-c").output()
            && o.status.success()
        {
            all.extend(parse_counters(family, &String::from_utf8_lossy(&o.stdout)));
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_whose_counter_moved_fired() {
        let before = parse_counters(
            "ip",
            "*filter\n:FORWARD ACCEPT [0:0]\n[5:300] -A FORWARD -p tcp -m tcp --dport 80 -j ACCEPT\n[0:0] -A FORWARD -p tcp -m tcp --dport 9004 -m comment --comment \"legacy leftover\" -j DROP\nCOMMIT\n",
        );
        let after = parse_counters(
            "ip",
            "*filter\n:FORWARD ACCEPT [0:0]\n[9:500] -A FORWARD -p tcp -m tcp --dport 80 -j ACCEPT\n[2:120] -A FORWARD -p tcp -m tcp --dport 9004 -m comment --comment \"legacy leftover\" -j DROP\nCOMMIT\n",
        );
        let f = fired(&before, &after);
        assert_eq!(f.len(), 1, "ACCEPT rules are not drops");
        assert_eq!(f[0].chain, "FORWARD");
        assert_eq!(f[0].position, Some(2));
        assert_eq!(f[0].comments, vec!["legacy leftover"]);
        assert!(fired(&after, &after).is_empty());
    }
}
