//! `tp_btf/tcp_retransmit_skb(sk, skb)`: retransmitted segments. SYN retransmits (state
//! `SYN_SENT`) are the signature of a silent drop: nobody answered, nobody refused. A data
//! retransmit carries its sequence number and length (from the skb's `tcp_skb_cb`): the same
//! segment sent again and again is a stalled connection, its size hints at a path MTU.
//!
//! A data retransmit is an event only after a retransmission timeout with nothing acknowledged
//! since (`icsk_retransmits > 0`): fast retransmits, loss probes and the retransmits that follow
//! a partial acknowledgement are how a busy healthy transfer recovers (hundreds a second under
//! iperf3 on a veth), so they are only counted (`counter::RETRANSMITS_COUNTED`), and the
//! connection's total comes with its state changes (`tcp_sock.total_retrans`).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{RawEvent, counter, kind, tcp_flags};

use crate::{emit, filter, kernel};

/// `TCP_SYN_SENT` in `include/net/tcp_states.h` (stable ABI: also exported to userspace).
const TCP_SYN_SENT: u32 = 2;

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk != 0 && !after_timeout(sk) {
        emit::count(counter::RETRANSMITS_COUNTED);
        return 0;
    }
    let _ = emit_for_sock(sk, ctx.arg(1), kind::RETRANSMIT);
    0
}

/// Has a retransmission timeout fired with nothing acknowledged since? The timer counts it
/// before it resends (`tcp_retransmit_timer`), an acknowledgement of new data resets it
/// (`tcp_ack`). SYN retransmits always come from the timer.
#[inline(always)]
fn after_timeout(sk: u64) -> bool {
    let o = kernel::offsets();
    kernel::read::<u8>(sk, o.icsk_retransmits).unwrap_or(1) != 0
}

/// An event described by a socket alone: tuple, namespace and state (in `aux`); for a
/// retransmit of `skb` also its sequence number and length.
pub fn emit_for_sock(sk: u64, skb: u64, event_kind: u8) -> Result<(), i32> {
    if sk == 0 {
        return Ok(());
    }
    let o = kernel::offsets();
    let mut ev = RawEvent {
        kind: event_kind,
        ..Default::default()
    };
    if !kernel::sock_tuple(sk, &mut ev, &o) {
        return Ok(());
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport)
        || !filter::netns_matches(ev.netns)
    {
        return Ok(());
    }
    ev.aux = kernel::sock_state(sk, &o);
    if event_kind == kind::RETRANSMIT && ev.aux == TCP_SYN_SENT {
        ev.tcp_flags = tcp_flags::SYN;
    }
    if event_kind == kind::RETRANSMIT && skb != 0 {
        // `struct tcp_skb_cb` starts with `seq` and `end_seq`.
        ev.seq = kernel::read::<u32>(skb, o.skb_cb).unwrap_or(0);
        let end = kernel::read::<u32>(skb, o.skb_cb + 4).unwrap_or(ev.seq);
        ev.reason = end.wrapping_sub(ev.seq);
    }
    emit::submit(&mut ev, true);
    Ok(())
}
