//! `nft -a list ruleset`, `iptables-save` (-c) text and rule comments, then owner translation
//! of every rule found.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netprobe::{
    attribution::cni::{self, calico},
    enrich::rules::{legacy, ruleset},
};

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
    // Owner translation of the first rules only: each call may walk the whole ruleset (once per
    // verdict in netprobe), so doing it for every rule made the harness quadratic and slow.
    let rules = rs.tables.iter().flat_map(|((family, table), t)| {
        t.chains.iter().flat_map(move |(chain, c)| {
            c.handles.iter().map(move |h| (family, table, chain, *h))
        })
    });
    for (family, table, chain, h) in rules.take(16) {
        if let Some(rule) = rs.rule(family, table, chain, h) {
            let _ = cni::owner_of(&rs, &rule, None);
        }
    }
    let _ = ruleset::comments(&text);
    let _ = calico::policy_name(&text);
    let before = legacy::parse_counters("ip", a);
    let after = legacy::parse_counters("ip", b);
    let _ = legacy::fired(&before, &after);
});
