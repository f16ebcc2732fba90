//! `tp_btf/tcp_send_reset(sk, skb[, reason])` and `tp_btf/tcp_receive_reset(sk)`.
//! A reset sent in answer to a segment that found no socket (the S2 "connection refused") has
//! `sk == NULL`: then the tuple and namespace come from the offending segment in `skb`.
//! <https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/tcp.h>

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{RawEvent, kind};

use crate::{emit, filter, kernel};

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let _ = try_tcp_send_reset(&ctx);
    0
}

fn try_tcp_send_reset(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let o = kernel::offsets();
    let mut ev = RawEvent {
        kind: kind::SEND_RESET,
        skb,
        sk,
        ..Default::default()
    };
    if o.rst_has_reason != 0 {
        ev.reason = ctx.arg::<u64>(2) as u32;
    }
    if skb != 0 {
        if !kernel::skb_headers(skb, &mut ev, &o) {
            return Ok(());
        }
        kernel::skb_place(skb, &mut ev, &o);
    } else if sk != 0 {
        if !kernel::sock_tuple(sk, &mut ev, &o) {
            return Ok(());
        }
        // An active reset (close with unread data, linger 0, abort) comes after the socket
        // was set to CLOSE, which cleared its port number: its own port is still in
        // `inet_sport`, without which the port filter would miss the reset.
        if ev.sport == 0 {
            ev.sport = u16::from_be(kernel::read::<u16>(sk, o.inet_sport).unwrap_or(0));
        }
        ev.aux = kernel::sock_state(sk, &o);
    } else {
        return Ok(());
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport)
        || !filter::netns_matches(ev.netns)
    {
        return Ok(());
    }
    emit::submit(&mut ev, true);
    Ok(())
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let _ = crate::tcp_retransmit::emit_for_sock(ctx.arg(0), 0, kind::RECEIVE_RESET);
    0
}
