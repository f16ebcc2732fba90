//! `tp_btf/inet_sock_set_state(sk, oldstate, newstate)`: TCP state changes. `SYN_SENT` is entered
//! in `connect()`, in the caller's context, which gives the pid/comm of the connecting process.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{IPPROTO_TCP, RawEvent, kind};

use crate::{emit, filter, kernel};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

/// Traces only: the always-on agent does not attach this program (see `TRACE_ONLY`).
fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    let o = kernel::offsets();
    let mut ev = RawEvent {
        kind: kind::STATE_CHANGE,
        ..Default::default()
    };
    if sk == 0 || !kernel::sock_tuple(sk, &mut ev, &o) || ev.proto != IPPROTO_TCP {
        return Ok(());
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport)
        || !filter::netns_matches(ev.netns)
    {
        return Ok(());
    }
    ev.aux = ctx.arg::<u64>(1) as u32;
    ev.reason = ctx.arg::<u64>(2) as u32;
    // How many segments the connection resent (data retransmits are events only after a
    // timeout): a closed connection's verdict says how lossy its life was.
    ev.seq = kernel::read::<u32>(sk, o.tcp_total_retrans).unwrap_or(0);
    emit::submit(&mut ev, true);
    Ok(())
}
