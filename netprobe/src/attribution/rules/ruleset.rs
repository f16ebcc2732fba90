//! The ruleset a trace is read against: `nft -a list ruleset` (every nf_tables table, rule handles
//! and text) joined with `iptables-nft-save`/`ip6tables-nft-save` for tables iptables-nft manages
//! (nft cannot print their xt matches: comments, marks, sets — exactly what names the object).
//! Parsers are pure and unit-tested; fetching runs the tools inside the namespace.

use std::collections::HashMap;

/// One chain of one table.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    /// `input`, `forward`, `prerouting` … for base chains.
    pub hook: Option<String>,
    pub policy: Option<String>,
    /// Rule handles in order.
    pub handles: Vec<u64>,
    /// handle → nft text (without the `# handle` suffix).
    pub rules: HashMap<u64, String>,
}

#[derive(Debug, Default, Clone)]
pub struct Table {
    pub chains: HashMap<String, Chain>,
    /// Managed by iptables-nft: rule text comes from iptables-save.
    pub iptables_nft: bool,
    /// Text of the table's sets and maps (kube-proxy nft mode keeps Service names there).
    pub sets_text: String,
}

/// (nft family, table name) → table.
#[derive(Debug, Default, Clone)]
pub struct Ruleset {
    pub tables: HashMap<(String, String), Table>,
    /// (family ip|ip6, table, chain) → iptables-save rule lines (`-A CHAIN …`), in order.
    pub iptables: HashMap<(String, String, String), Vec<String>>,
    /// Rules in the iptables-legacy (x_tables) backend, which nf_tables traces cannot see.
    pub legacy_rules: usize,
}

fn handle_of(line: &str) -> Option<(u64, &str)> {
    let i = line.rfind("# handle ")?;
    let h = line[i + 9..].trim().parse().ok()?;
    Some((h, line[..i].trim_end()))
}

/// Parses `nft -a list ruleset`.
pub fn parse_nft(text: &str) -> HashMap<(String, String), Table> {
    let mut tables: HashMap<(String, String), Table> = HashMap::new();
    let mut table: Option<(String, String)> = None;
    let mut chain: Option<String> = None;
    // Depth of braces inside the current table; 1 = table body, 2 = chain/set body.
    let mut depth = 0i32;
    let mut in_set = false;
    for raw in text.lines() {
        let line = raw.trim();
        // nft appends "# Warning: table ip filter is managed by iptables-nft, do not touch!"
        // after the table's closing brace, on the same line.
        if let Some(i) = line.find("# Warning: table ") {
            let rest = &line[i + "# Warning: table ".len()..];
            // "# Warning: table ip filter is managed by iptables-nft, do not touch!"
            let mut it = rest.split_whitespace();
            if let (Some(f), Some(t)) = (it.next(), it.next())
                && rest.contains("managed by iptables-nft")
                && let Some(tb) = tables.get_mut(&(f.to_string(), t.to_string()))
            {
                tb.iptables_nft = true;
            }
            if i == 0 {
                continue;
            }
        }
        let line = line
            .split("# Warning: table ")
            .next()
            .unwrap_or(line)
            .trim();
        if depth == 0 {
            if let Some(rest) = line.strip_prefix("table ") {
                let mut it = rest.split_whitespace();
                if let (Some(f), Some(t)) = (it.next(), it.next()) {
                    let key = (f.to_string(), t.to_string());
                    tables.entry(key.clone()).or_default();
                    table = Some(key);
                    depth = 1;
                }
            }
            continue;
        }
        let Some(key) = table.clone() else { continue };
        let opens = line.matches('{').count() as i32;
        let closes = line.matches('}').count() as i32;
        if depth == 1 {
            if let Some(rest) = line.strip_prefix("chain ") {
                let name = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                tables
                    .get_mut(&key)
                    .unwrap()
                    .chains
                    .entry(name.clone())
                    .or_default();
                chain = Some(name);
                in_set = false;
            } else if line.starts_with("set ") || line.starts_with("map ") {
                chain = None;
                in_set = true;
                let tb = tables.get_mut(&key).unwrap();
                tb.sets_text.push_str(line);
                tb.sets_text.push('\n');
            }
        } else if depth >= 2 {
            let tb = tables.get_mut(&key).unwrap();
            if in_set {
                tb.sets_text.push_str(line);
                tb.sets_text.push('\n');
            } else if let Some(c) = chain.as_ref().and_then(|c| tb.chains.get_mut(c)) {
                if depth == 2 && line.starts_with("type ") && line.contains(" hook ") {
                    c.hook = line
                        .split_whitespace()
                        .skip_while(|w| *w != "hook")
                        .nth(1)
                        .map(str::to_string);
                    c.policy = line
                        .split("policy ")
                        .nth(1)
                        .map(|p| p.trim_end_matches(';').trim().to_string());
                } else if depth == 2
                    && let Some((h, text)) = handle_of(line)
                {
                    c.handles.push(h);
                    c.rules.insert(h, text.to_string());
                }
            }
        }
        depth += opens - closes;
        if depth <= 0 {
            depth = 0;
            table = None;
            chain = None;
        }
    }
    tables
}

/// Parses `iptables-save` output into (table, chain) → rule lines.
pub fn parse_iptables_save(text: &str) -> HashMap<(String, String), Vec<String>> {
    let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rest) = line.strip_prefix(":") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            out.entry((table.clone(), chain.to_string())).or_default();
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            out.entry((table.clone(), chain.to_string()))
                .or_default()
                .push(line.to_string());
        }
    }
    out
}

/// Every `--comment` of an iptables-save line, and the `comment "…"` of an nft rule.
pub fn comments(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    // iptables-save syntax (`-m comment --comment X`) or nft syntax (`comment "X"`).
    let marker = if rule.contains("--comment ") {
        "--comment "
    } else {
        "comment "
    };
    {
        let mut rest = rule;
        while let Some(i) = rest.find(marker) {
            let after = &rest[i + marker.len()..];
            let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
                let mut end = 0;
                let bytes = q.as_bytes();
                while end < bytes.len()
                    && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\'))
                {
                    end += 1;
                }
                (q[..end].replace("\\\"", "\""), &q[(end + 1).min(q.len())..])
            } else {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_string(), &after[end..])
            };
            if !out.contains(&value) {
                out.push(value);
            }
            rest = remaining;
        }
    }
    out
}

/// What the trace names: one rule, with its text as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    /// 1-based position in the chain (what `iptables -L --line-numbers` shows).
    pub position: Option<usize>,
    /// iptables-save form for iptables-nft tables, nft form otherwise.
    pub text: String,
    pub nft_text: Option<String>,
    pub comments: Vec<String>,
}

impl Ruleset {
    pub fn from_outputs(nft: &str, iptables_save_v4: &str, iptables_save_v6: &str) -> Self {
        let tables = parse_nft(nft);
        let mut iptables = HashMap::new();
        for (fam, text) in [("ip", iptables_save_v4), ("ip6", iptables_save_v6)] {
            for ((t, c), rules) in parse_iptables_save(text) {
                iptables.insert((fam.to_string(), t, c), rules);
            }
        }
        Self {
            tables,
            iptables,
            legacy_rules: 0,
        }
    }

    /// Rules live in both backends: a known Calico breakage after a migration (felix and
    /// kube-proxy disagreeing on the iptables mode), and a reason a drop may have no nft trace.
    pub fn mixed_backends(&self) -> bool {
        let nft_rules = self
            .tables
            .iter()
            .filter(|((_, t), _)| !t.starts_with(super::NETPROBE_TABLE_PREFIX))
            .any(|(_, t)| t.chains.values().any(|c| !c.handles.is_empty()));
        self.legacy_rules > 0 && nft_rules
    }

    /// Whether iptables-nft-save lists this table (then it is iptables-nft managed).
    pub fn has_iptables_table(&self, family: &str, table: &str) -> bool {
        self.iptables
            .keys()
            .any(|(f, t, _)| f == family && t == table)
    }

    pub fn table(&self, family: &str, table: &str) -> Option<&Table> {
        self.tables.get(&(family.to_string(), table.to_string()))
    }

    pub fn chain(&self, family: &str, table: &str, chain: &str) -> Option<&Chain> {
        self.table(family, table)?.chains.get(chain)
    }

    /// The rule behind a trace's (family, table, chain, handle).
    pub fn rule(&self, family: &str, table: &str, chain: &str, handle: u64) -> Option<RuleRef> {
        let c = self.chain(family, table, chain)?;
        let pos = c.handles.iter().position(|h| *h == handle);
        self.rule_at(family, table, chain, handle, pos)
    }

    /// [`Self::rule`] when the rule's position in its chain is already known.
    fn rule_at(
        &self,
        family: &str,
        table: &str,
        chain: &str,
        handle: u64,
        pos: Option<usize>,
    ) -> Option<RuleRef> {
        let tb = self.table(family, table)?;
        let c = tb.chains.get(chain)?;
        let nft_text = c.rules.get(&handle)?.clone();
        let ipt = if tb.iptables_nft || self.has_iptables_table(family, table) {
            pos.and_then(|p| {
                let lines = self.iptables.get(&(
                    family.to_string(),
                    table.to_string(),
                    chain.to_string(),
                ))?;
                // Only trust the position join when both views agree on the chain's length.
                (lines.len() == c.handles.len()).then(|| lines[p].clone())
            })
        } else {
            None
        };
        let text = ipt.clone().unwrap_or_else(|| nft_text.clone());
        let mut cm = comments(&text);
        if ipt.is_some() {
            for extra in comments(&nft_text) {
                if !cm.contains(&extra) {
                    cm.push(extra);
                }
            }
        }
        Some(RuleRef {
            family: family.to_string(),
            table: table.to_string(),
            chain: chain.to_string(),
            handle,
            position: pos.map(|p| p + 1),
            text,
            nft_text: ipt.map(|_| nft_text),
            comments: cm,
        })
    }

    /// Rules of a chain in order (RuleRefs), for translators that read the chain around a hit.
    pub fn rules_of(&self, family: &str, table: &str, chain: &str) -> Vec<RuleRef> {
        let Some(c) = self.chain(family, table, chain) else {
            return Vec::new();
        };
        c.handles
            .iter()
            .enumerate()
            .filter_map(|(i, h)| self.rule_at(family, table, chain, *h, Some(i)))
            .collect()
    }

    /// The first rule of a chain (a Calico policy chain names its policy there).
    pub fn first_rule_of(&self, family: &str, table: &str, chain: &str) -> Option<RuleRef> {
        let h = *self.chain(family, table, chain)?.handles.first()?;
        self.rule_at(family, table, chain, h, Some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT: &str = r#"table inet netprobe_1 { # handle 1
	chain pre { # handle 1
		type filter hook prerouting priority -2147483648; policy accept;
		tcp dport 9004 meta nftrace set 1 # handle 3
	}
}
table ip filter { # handle 2
	chain INPUT { # handle 1
		type filter hook input priority filter; policy accept;
		tcp dport 9004  counter packets 0 bytes 0 reject # handle 2
		meta mark & 0x00010000 != 0x00010000 ct state invalid counter packets 0 bytes 0 drop # handle 3
	}
	chain cali-pi-_abc { # handle 9
		counter packets 0 bytes 0 # handle 10
	}
}
# Warning: table ip filter is managed by iptables-nft, do not touch!
table ip kube-proxy { # handle 5
	map no-endpoint-services { # handle 7
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
		elements = { 10.43.51.131 . tcp . 9004 comment "financial-inference/seldon-scheduler:xds" : goto reject-chain }
	}
	chain filter-forward { # handle 8
		type filter hook forward priority -110; policy accept;
		ct state new jump service-endpoints-check # handle 11
	}
	chain reject-chain { # handle 12
		comment "helper for @no-endpoint-services / @no-endpoint-nodeports"
		reject # handle 13
	}
}
"#;

    const SAVE: &str = "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n:cali-pi-_abc - [0:0]\n-A INPUT -p tcp -m tcp --dport 9004 -m comment --comment \"test comment\" -j REJECT --reject-with icmp-port-unreachable\n-A INPUT -m mark ! --mark 0x10000/0x10000 -m conntrack --ctstate INVALID -j DROP\n-A cali-pi-_abc -m comment --comment \"cali:abc\" -m comment --comment \"Policy financial-inference/knp.default.scheduler-allow-xds ingress\"\nCOMMIT\n";

    #[test]
    fn parses_tables_chains_hooks_and_handles() {
        let t = parse_nft(NFT);
        let filter = &t[&("ip".to_string(), "filter".to_string())];
        assert!(filter.iptables_nft);
        let input = &filter.chains["INPUT"];
        assert_eq!(input.hook.as_deref(), Some("input"));
        assert_eq!(input.policy.as_deref(), Some("accept"));
        assert_eq!(input.handles, vec![2, 3]);
        let kp = &t[&("ip".to_string(), "kube-proxy".to_string())];
        assert!(!kp.iptables_nft);
        assert_eq!(kp.chains["filter-forward"].hook.as_deref(), Some("forward"));
        assert_eq!(kp.chains["reject-chain"].handles, vec![13]);
        assert!(
            kp.sets_text
                .contains("financial-inference/seldon-scheduler:xds")
        );
        assert!(!t[&("inet".to_string(), "netprobe_1".to_string())].iptables_nft);
    }

    #[test]
    fn iptables_nft_rules_take_their_text_and_comments_from_iptables_save() {
        let rs = Ruleset::from_outputs(NFT, SAVE, "");
        let r = rs.rule("ip", "filter", "INPUT", 2).unwrap();
        assert_eq!(r.position, Some(1));
        assert!(r.text.contains("-j REJECT"), "{}", r.text);
        assert_eq!(r.comments, vec!["test comment"]);
        let p = rs.rule("ip", "filter", "cali-pi-_abc", 10).unwrap();
        assert_eq!(
            p.comments,
            vec![
                "cali:abc",
                "Policy financial-inference/knp.default.scheduler-allow-xds ingress"
            ]
        );
        let native = rs.rule("ip", "kube-proxy", "reject-chain", 13).unwrap();
        assert_eq!(native.text, "reject");
        assert!(rs.rule("ip", "filter", "INPUT", 99).is_none());
    }

    #[test]
    fn comments_in_both_syntaxes() {
        assert_eq!(
            comments(r#"-A X -m comment --comment "a b" -m comment --comment c -j DROP"#),
            vec!["a b", "c"]
        );
        assert_eq!(
            comments(r#"ct state invalid drop comment "cali:x; Unknown interface""#),
            vec!["cali:x; Unknown interface"]
        );
        assert_eq!(
            comments(r#"comment "with \"quote\"""#),
            vec![r#"with "quote""#]
        );
        assert!(comments("drop").is_empty());
    }
}
