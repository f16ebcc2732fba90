//! iptables-legacy (x_tables) has no nftables trace: when the ring buffer reports a drop inside
//! x_tables (`kfree_skb` at `nf_hook_slow`), the rules whose packet counters moved since the last
//! look are the ones that fired. A stage, not a timer: it reads the counters only then, and the
//! `netfilter` event it derives follows the drop through the rest of the pipeline.

use super::nftrace::SharedRules;
use crate::{
    attribution::rules::{attribute_legacy, legacy},
    enrich::Stage,
    events::{self, Event, Kind},
    model::Protocol,
};

pub struct XtablesCounters {
    rules: SharedRules,
    /// The traced flow's protocol (TCP or UDP).
    proto: Protocol,
}

impl XtablesCounters {
    pub fn new(rules: SharedRules, proto: Protocol) -> Self {
        Self { rules, proto }
    }
}

fn in_x_tables(e: &Event) -> bool {
    e.kind == Kind::Drop
        && e.drop
            .as_ref()
            .is_some_and(|d| d.location.starts_with("nf_hook_slow"))
}

impl Stage for XtablesCounters {
    fn enrich(&mut self, e: &mut Event, derived: &mut Vec<Event>) {
        if !in_x_tables(e) {
            return;
        }
        let inode = e.netns.as_ref().map(|n| n.inode);
        let mut rules = self.rules.borrow_mut();
        let Some(r) = rules.iter_mut().find(|r| Some(r.ns.inode) == inode) else {
            return;
        };
        let Some(before) = &mut r.legacy else {
            return;
        };
        let Ok(after) = r.ns.run(legacy::snapshot) else {
            return;
        };
        let fired = legacy::fired(before, &after);
        *before = after;
        if let Some(nf) = attribute_legacy(&fired, &r.ruleset, Some((e.dst, e.dport))) {
            derived.push(events::netfilter(
                e.time_ns,
                self.proto,
                e.netns.clone(),
                e.interface.clone(),
                Some((e.src, e.sport, e.dst, e.dport)),
                nf,
            ));
        }
    }
}
