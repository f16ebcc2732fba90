//! `tp_btf/inet_sk_error_report(sk)`: the errno (`sk->sk_err`) the application is about to see,
//! e.g. ECONNREFUSED after an RST, ETIMEDOUT after the last SYN retransmit.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use netprobe_common::{RawEvent, kind};

use crate::{emit, filter, kernel};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    let _ = try_inet_sk_error_report(&ctx);
    0
}

fn try_inet_sk_error_report(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    let o = kernel::offsets();
    let mut ev = RawEvent {
        kind: kind::SOCK_ERROR,
        ..Default::default()
    };
    if sk == 0 || !kernel::sock_tuple(sk, &mut ev, &o) {
        return Ok(());
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport)
        || !filter::netns_matches(ev.netns)
    {
        return Ok(());
    }
    // While the process holds the socket (loopback delivers in its context), TCP stores the
    // error in sk_err_soft instead; connect() then reports that one.
    let mut err = kernel::read::<i32>(sk, o.sk_err).unwrap_or(0);
    if err == 0 {
        err = kernel::read::<i32>(sk, o.sk_err_soft).unwrap_or(0);
    }
    ev.reason = err as u32;
    ev.aux = kernel::sock_state(sk, &o);
    emit::submit(&mut ev, true);
    Ok(())
}
