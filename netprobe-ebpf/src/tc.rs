//! tc classifier on veth and lo, ingress and egress (tcx where the kernel has it, clsact
//! otherwise): the checkpoints a SYN passes. Emits TCP SYN, SYN-ACK and RST, ICMP/ICMPv6
//! destination-unreachable errors (tuple of the quoted packet), and UDP datagrams (see
//! [`filter::udp_wanted`]; DNS ones with the start of their message), when they match the
//! filter.
//!
//! Always returns `TC_ACT_UNSPEC`: with tcx that is "next program", with clsact "continue", so
//! netprobe never decides a packet's fate (Calico eBPF or Cilium programs keep working).

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use netprobe_common::{
    AF_INET, AF_INET6, DNS_PORT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, RawEvent,
    kind, tcp_flags,
};

use crate::{emit, filter, kernel};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// TCP option kind of the MSS (RFC 9293), which Linux writes first in a SYN's options.
const TCPOPT_MSS: u8 = 2;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let _ = try_tc(&ctx, kind::TC_INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let _ = try_tc(&ctx, kind::TC_EGRESS);
    TC_ACT_UNSPEC
}

/// The per-packet fast path: a few loads decide whether the packet can be an event at all
/// (TCP SYN or RST — only RST in always-on mode — or ICMP), before an event is built. Bulk data
/// and ACKs, nearly every packet, leave here. The headers are read straight from the packet's
/// linear data, without a helper call per field, wherever they are there (all veth and lo
/// traffic); otherwise through `bpf_skb_load_bytes`.
#[inline(always)]
fn candidate(ctx: &TcContext) -> Result<bool, i64> {
    match candidate_direct(ctx) {
        Some(wanted) => Ok(wanted),
        None => candidate_loaded(ctx),
    }
}

/// [`candidate`] by direct packet access; `None` when the headers are not all in linear data
/// (or the packet is shorter than an Ethernet + IPv6 header: small UDP and ICMP packets).
#[inline(always)]
fn candidate_direct(ctx: &TcContext) -> Option<bool> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN + 40 > end {
        return None;
    }
    // SAFETY: every offset read below is inside [data, end), checked against `end` first.
    let byte = |at: usize| unsafe { *(at as *const u8) };
    let ethertype = u16::from_be_bytes([byte(data + 12), byte(data + 13)]);
    let (proto, l4) = match ethertype {
        ETH_P_IP => (
            byte(data + ETH_HLEN + 9),
            data + ETH_HLEN + (byte(data + ETH_HLEN) & 0x0f) as usize * 4,
        ),
        ETH_P_IPV6 => (byte(data + ETH_HLEN + 6), data + ETH_HLEN + 40),
        _ => return Some(false),
    };
    match proto {
        IPPROTO_TCP => {
            if l4 + 14 > end {
                return None;
            }
            let wanted = if filter::failures_only() {
                tcp_flags::RST
            } else {
                tcp_flags::SYN | tcp_flags::RST
            };
            Some(byte(l4 + 13) & wanted != 0)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(true),
        IPPROTO_UDP => {
            if l4 + 4 > end {
                return None;
            }
            let sport = u16::from_be_bytes([byte(l4), byte(l4 + 1)]);
            let dport = u16::from_be_bytes([byte(l4 + 2), byte(l4 + 3)]);
            Some(filter::udp_wanted(sport, dport))
        }
        _ => Some(false),
    }
}

/// [`candidate`] through `bpf_skb_load_bytes` (headers outside the linear data).
#[inline(always)]
fn candidate_loaded(ctx: &TcContext) -> Result<bool, i64> {
    let (proto, l4) = match u16::from_be(ctx.load::<u16>(12)?) {
        ETH_P_IP => {
            let ihl = (ctx.load::<u8>(ETH_HLEN)? & 0x0f) as usize * 4;
            (ctx.load::<u8>(ETH_HLEN + 9)?, ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => (ctx.load::<u8>(ETH_HLEN + 6)?, ETH_HLEN + 40),
        _ => return Ok(false),
    };
    match proto {
        IPPROTO_TCP => {
            let flags = ctx.load::<u8>(l4 + 13)?;
            let wanted = if filter::failures_only() {
                tcp_flags::RST
            } else {
                tcp_flags::SYN | tcp_flags::RST
            };
            Ok(flags & wanted != 0)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Ok(true),
        IPPROTO_UDP => {
            let sport = u16::from_be(ctx.load::<u16>(l4)?);
            let dport = u16::from_be(ctx.load::<u16>(l4 + 2)?);
            Ok(filter::udp_wanted(sport, dport))
        }
        _ => Ok(false),
    }
}

fn try_tc(ctx: &TcContext, direction: u8) -> Result<(), i64> {
    if !candidate(ctx)? {
        return Ok(());
    }
    let mut ev = RawEvent {
        kind: direction,
        ..Default::default()
    };
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let l4 = match ethertype {
        ETH_P_IP => ipv4(ctx, ETH_HLEN, &mut ev)?,
        ETH_P_IPV6 => ipv6(ctx, ETH_HLEN, &mut ev)?,
        _ => return Ok(()),
    };
    // Where a DNS message starts, for datagrams to or from port 53.
    let mut dns_at = None;
    match ev.proto {
        IPPROTO_UDP => {
            ev.sport = u16::from_be(ctx.load::<u16>(l4)?);
            ev.dport = u16::from_be(ctx.load::<u16>(l4 + 2)?);
            if ev.sport == DNS_PORT || ev.dport == DNS_PORT {
                dns_at = Some(l4 + 8);
            }
        }
        IPPROTO_TCP => {
            ev.tcp_flags = ctx.load::<u8>(l4 + 13)?;
            if ev.tcp_flags & (tcp_flags::SYN | tcp_flags::RST) == 0 {
                return Ok(());
            }
            if ev.tcp_flags & tcp_flags::RST == 0 && filter::failures_only() {
                return Ok(());
            }
            ev.sport = u16::from_be(ctx.load::<u16>(l4)?);
            ev.dport = u16::from_be(ctx.load::<u16>(l4 + 2)?);
            ev.seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
            if ev.tcp_flags & tcp_flags::SYN != 0 {
                ev.aux = syn_mss(ctx, l4);
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp_type = ctx.load::<u8>(l4)?;
            let code = ctx.load::<u8>(l4 + 1)?;
            let quoted = l4 + 8;
            let inner_l4 = if ev.proto == IPPROTO_ICMP {
                if icmp_type != ICMP_DEST_UNREACH {
                    return Ok(());
                }
                ipv4(ctx, quoted, &mut ev)?
            } else {
                if icmp_type != ICMPV6_DEST_UNREACH && icmp_type != ICMPV6_PKT_TOOBIG {
                    return Ok(());
                }
                ipv6(ctx, quoted, &mut ev)?
            };
            // `ev.proto` is now the quoted packet's protocol; keep it only if we trace it.
            if ev.proto != IPPROTO_TCP && ev.proto != IPPROTO_UDP {
                return Ok(());
            }
            ev.sport = u16::from_be(ctx.load::<u16>(inner_l4)?);
            ev.dport = u16::from_be(ctx.load::<u16>(inner_l4 + 2)?);
            ev.aux = ((icmp_type as u32) << 8) | code as u32;
            ev.proto = if ev.family == AF_INET {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
        }
        _ => return Ok(()),
    }
    if !filter::tuple_matches(ev.family, &ev.saddr, &ev.daddr, ev.sport, ev.dport) {
        return Ok(());
    }
    // SAFETY: `skb` is the context pointer the kernel passed in.
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The same ifindex exists in many namespaces (a pod's eth0 and a node interface): the
    // device's own namespace says which interface this is.
    ev.netns = kernel::skb_dev_netns(ctx.skb.skb as u64, &kernel::offsets());
    match dns_at {
        Some(off) => emit::submit_dns(ctx, ev, off),
        None => emit::submit(&mut ev, false),
    }
    Ok(())
}

/// The MSS a SYN or SYN-ACK announces (its first option, where Linux puts it); 0 if absent.
/// Read once per handshake, never for data segments.
#[inline(always)]
fn syn_mss(ctx: &TcContext, l4: usize) -> u32 {
    let doff = ctx.load::<u8>(l4 + 12).map(|b| b >> 4).unwrap_or(0);
    if doff <= 5 || ctx.load::<u8>(l4 + 20).unwrap_or(0) != TCPOPT_MSS {
        return 0;
    }
    ctx.load::<u16>(l4 + 22).map(u16::from_be).unwrap_or(0) as u32
}

/// Reads an IPv4 header at `off`; returns the offset of the transport header.
#[inline(always)]
fn ipv4(ctx: &TcContext, off: usize, ev: &mut RawEvent) -> Result<usize, i64> {
    let ver_ihl = ctx.load::<u8>(off)?;
    let frag = u16::from_be(ctx.load::<u16>(off + 6)?);
    if frag & 0x1fff != 0 {
        return Err(0);
    }
    ev.family = AF_INET;
    ev.proto = ctx.load::<u8>(off + 9)?;
    ev.saddr = [0; 16];
    ev.daddr = [0; 16];
    ev.saddr[..4].copy_from_slice(&ctx.load::<[u8; 4]>(off + 12)?);
    ev.daddr[..4].copy_from_slice(&ctx.load::<[u8; 4]>(off + 16)?);
    Ok(off + ((ver_ihl & 0x0f) as usize) * 4)
}

/// Reads an IPv6 fixed header at `off` (extension headers are not walked).
#[inline(always)]
fn ipv6(ctx: &TcContext, off: usize, ev: &mut RawEvent) -> Result<usize, i64> {
    ev.family = AF_INET6;
    ev.proto = ctx.load::<u8>(off + 6)?;
    ev.saddr = ctx.load::<[u8; 16]>(off + 8)?;
    ev.daddr = ctx.load::<[u8; 16]>(off + 24)?;
    Ok(off + 40)
}
