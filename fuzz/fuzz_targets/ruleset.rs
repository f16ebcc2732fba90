//! `nft -a list ruleset`, `iptables-save` (-c) text and rule comments, then owner translation
//! of every rule found.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netprobe::enrich::rules::{legacy, owners, ruleset};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mid = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| *i >= text.len() / 2)
        .unwrap_or(text.len());
    let (a, b) = text.split_at(mid);
    let rs = ruleset::Ruleset::from_outputs(&text, a, b);
    let _ = rs.mixed_backends();
    for ((family, table), t) in &rs.tables {
        for (chain, c) in &t.chains {
            for h in &c.handles {
                if let Some(rule) = rs.rule(family, table, chain, *h) {
                    let _ = owners::owner_of(&rs, &rule, None);
                }
            }
        }
    }
    let _ = ruleset::comments(&text);
    let _ = owners::calico_policy_name(&text);
    let before = legacy::parse_counters("ip", a);
    let after = legacy::parse_counters("ip", b);
    let _ = legacy::fired(&before, &after);
});
