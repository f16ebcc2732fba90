//! `tp_btf/kfree_skb(skb, location, reason, …)`: every packet the kernel drops, with the reason
//! (`enum skb_drop_reason`, named by userspace from BTF) and the code location.
//! <https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/skb.h>

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{RawEvent, kind};

use crate::{emit, filter, kernel};

/// `SKB_NOT_DROPPED_YET` (0) and `SKB_CONSUMED` (1) are the same in every kernel that has reasons.
const FIRST_DROP_REASON: u32 = 2;

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

fn try_kfree_skb(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let reason: u32 = ctx.arg::<u64>(2) as u32;
    if reason < FIRST_DROP_REASON {
        return Ok(());
    }
    emit::count_drop(reason);
    let skb: u64 = ctx.arg(0);
    let o = kernel::offsets();
    let mut ev = RawEvent {
        kind: kind::DROP,
        skb,
        reason,
        ..Default::default()
    };
    // Routine teardown (a QUEUE_PURGE per closed connection) in always-on mode: counted in
    // scope, without parsing headers no filter needs there (the agent filters by netns only).
    if filter::failures_only() && emit::quiet_always(reason) {
        if kernel::skb_is_ip(skb, &o) {
            kernel::skb_place(skb, &mut ev, &o);
            if filter::netns_matches(ev.netns) {
                emit::count_matched_drop(reason);
            }
        }
        return Ok(());
    }
    if !kernel::skb_headers(skb, &mut ev, &o) {
        return Ok(());
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport) {
        return Ok(());
    }
    kernel::skb_place(skb, &mut ev, &o);
    if !filter::netns_matches(ev.netns) {
        return Ok(());
    }
    emit::count_matched_drop(reason);
    if filter::failures_only() && emit::quiet_drop(reason, &ev) {
        return Ok(());
    }
    ev.location = ctx.arg(1);
    // The address dialled (a ClusterIP before DNAT) names the Service at the first drop.
    kernel::skb_conntrack_dst(skb, &mut ev);
    emit::submit(&mut ev, true);
    Ok(())
}
