//! `tp_btf/fib_table_lookup(tb_id, flp, nhc, err)`: an IPv4 route lookup of one table. A
//! connect() (or send) whose lookup fails — an `unreachable`, `blackhole`, `prohibit` or `throw`
//! route, or none — returns an error before any packet exists, so no other probe sees it.
//! Successful lookups are the hot path and return at the first test; only failed lookups of a
//! task in a watched namespace, for the traced destination and port, become events.
//! <https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/fib.h>

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{AF_INET, IPPROTO_TCP, IPPROTO_UDP, RawEvent, kind};

use crate::{emit, filter, kernel};

/// `LOOPBACK_IFINDEX`: the `flowi4_iif` of every output lookup (`ip_route_output_key_hash`);
/// input lookups (forwarded or received packets, in softirq, where the current task means
/// nothing) carry their device's index.
const LOOPBACK_IFINDEX: u32 = 1;

/// `-EAGAIN`: this table has no route for the flow; the lookup goes on to the next table.
const EAGAIN: i32 = -11;
/// `RT_TABLE_MAIN`: the table whose miss is worth an event (see below).
const RT_TABLE_MAIN: u32 = 254;

#[btf_tracepoint(function = "fib_table_lookup")]
pub fn fib_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let _ = try_fib_table_lookup(&ctx);
    0
}

fn try_fib_table_lookup(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let err = ctx.arg::<u64>(3) as i32;
    if err >= 0 {
        return Ok(());
    }
    // With policy rules every lookup first misses the local table (and maybe others) before it
    // finds its route: those misses are part of successful lookups. A miss of the main table is
    // where a missing route shows (userspace checks the other tables before it says so).
    if err == EAGAIN && ctx.arg::<u64>(0) as u32 != RT_TABLE_MAIN {
        return Ok(());
    }
    let flp: u64 = ctx.arg(1);
    let o = kernel::route_offsets();
    if flp == 0 || kernel::read::<u32>(flp, o.fl4_iif)? != LOOPBACK_IFINDEX {
        return Ok(());
    }
    let proto = kernel::read::<u8>(flp, o.fl4_proto)?;
    // A connect() or send: the lookup knows the destination port (ICMP lookups carry type and
    // code in the same place; reply lookups in softirq have no watched task behind them).
    let dport = u16::from_be(kernel::read::<u16>(flp, o.fl4_dport)?);
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || dport == 0 {
        return Ok(());
    }
    let mut ev = RawEvent {
        kind: kind::ROUTE_FAILED,
        family: AF_INET,
        proto,
        dport,
        sport: u16::from_be(kernel::read::<u16>(flp, o.fl4_sport)?),
        reason: (-err) as u32,
        aux: ctx.arg::<u64>(0) as u32,
        ..Default::default()
    };
    ev.saddr[..4].copy_from_slice(&kernel::read::<[u8; 4]>(flp, o.fl4_saddr)?);
    ev.daddr[..4].copy_from_slice(&kernel::read::<[u8; 4]>(flp, o.fl4_daddr)?);
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport) {
        return Ok(());
    }
    ev.netns = kernel::current_netns(&o, &kernel::offsets());
    if ev.netns == 0 || !filter::netns_matches(ev.netns) {
        return Ok(());
    }
    emit::submit(&mut ev, true);
    Ok(())
}
