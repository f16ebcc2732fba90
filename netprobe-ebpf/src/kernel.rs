//! Readers of kernel structures. Rust eBPF has no CO-RE relocations, so member offsets come from
//! the running kernel's BTF, resolved by userspace and passed in `OFFSETS`.
//!
//! Packet headers are read from `skb->head + skb->network_header`, never through `skb->sk`:
//! forwarded and loopback SYNs that die have no owning socket, and those are exactly the packets
//! netprobe exists to explain.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
};
use netprobe_common::{
    AF_INET, AF_INET6, ConntrackOffsets, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    KernelOffsets, RawEvent, RouteOffsets,
};

#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_dev: 0,
    skb_sk: 0,
    dev_nd_net: 0,
    dev_ifindex: 0,
    net_ns_inum: 0,
    sk_net: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_family: 0,
    sk_state: 0,
    sk_err: 0,
    sk_protocol: 0,
    sk_err_soft: 0,
    icsk_retransmits: 0,
    rst_has_reason: 0,
    skb_cb: 0,
    tcp_total_retrans: 0,
    inet_sport: 0,
});

#[unsafe(no_mangle)]
static ROUTE_OFFSETS: Global<RouteOffsets> = Global::new(RouteOffsets {
    fl4_iif: 0,
    fl4_proto: 0,
    fl4_saddr: 0,
    fl4_daddr: 0,
    fl4_dport: 0,
    fl4_sport: 0,
    task_nsproxy: 0,
    nsproxy_net_ns: 0,
});

#[unsafe(no_mangle)]
static CONNTRACK_OFFSETS: Global<ConntrackOffsets> = Global::new(ConntrackOffsets {
    skb_nfct: 0,
    ct_orig_daddr: 0,
    ct_orig_dport: 0,
    _pad: 0,
});

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    OFFSETS.load()
}

#[inline(always)]
pub fn route_offsets() -> RouteOffsets {
    ROUTE_OFFSETS.load()
}

#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// `net->ns.inum` of a `struct net *`.
#[inline(always)]
fn net_inum(net: u64, o: &KernelOffsets) -> u32 {
    if net == 0 {
        return 0;
    }
    read::<u32>(net, o.net_ns_inum).unwrap_or(0)
}

/// The namespace (its inode) of the current task: the one a connect() or send runs in, for
/// events in process context that carry no device or socket. 0 if unknown.
#[inline(always)]
pub fn current_netns(r: &RouteOffsets, o: &KernelOffsets) -> u32 {
    // SAFETY: the helper returns the current task's address (never dereferenced here).
    let task = unsafe { bpf_get_current_task() };
    let nsproxy = read::<u64>(task, r.task_nsproxy).unwrap_or(0);
    if nsproxy == 0 {
        // An exiting task has dropped its namespaces.
        return 0;
    }
    net_inum(read::<u64>(nsproxy, r.nsproxy_net_ns).unwrap_or(0), o)
}

/// `_nfct` holds the `struct nf_conn *` and the `ctinfo` in its low 3 bits (NFCT_INFOMASK).
const NFCT_PTRMASK: u64 = !7;

/// The destination of `skb`'s conntrack entry in the original direction (the address and port
/// dialled, before any DNAT): fills `orig_daddr`, `orig_dport` and `orig_known`. The entry is
/// attached by PREROUTING/OUTPUT (unconfirmed until the packet leaves), so a packet dropped by a
/// later rule still has it. Nothing when the kernel has no conntrack or the packet no entry.
#[inline(always)]
pub fn skb_conntrack_dst(skb: u64, ev: &mut RawEvent) {
    let o = CONNTRACK_OFFSETS.load();
    if o.skb_nfct == 0 {
        return;
    }
    let ct = read::<u64>(skb, o.skb_nfct).unwrap_or(0) & NFCT_PTRMASK;
    if ct == 0 {
        return;
    }
    let Ok(port) = read::<u16>(ct, o.ct_orig_dport) else {
        return;
    };
    let n = if ev.family == AF_INET { 4 } else { 16 };
    // Straight into the event: a temporary copy would not fit the drop program's stack.
    // SAFETY: bpf_probe_read_kernel_buf validates the source; `n` ≤ the field's 16 bytes.
    let src = (ct + o.ct_orig_daddr as u64) as *const u8;
    if unsafe { bpf_probe_read_kernel_buf(src, &mut ev.orig_daddr[..n]) }.is_err() {
        return;
    }
    ev.orig_dport = u16::from_be(port);
    ev.orig_known = 1;
}

/// Fills `netns` and `ifindex` from `skb->dev`, or the netns from `skb->sk` when there is no
/// device (locally generated packets before routing).
#[inline(always)]
pub fn skb_place(skb: u64, ev: &mut RawEvent, o: &KernelOffsets) {
    let dev = read::<u64>(skb, o.skb_dev).unwrap_or(0);
    if dev != 0 {
        ev.ifindex = read::<u32>(dev, o.dev_ifindex).unwrap_or(0);
        ev.netns = net_inum(read::<u64>(dev, o.dev_nd_net).unwrap_or(0), o);
        return;
    }
    let sk = read::<u64>(skb, o.skb_sk).unwrap_or(0);
    if sk != 0 {
        ev.netns = net_inum(read::<u64>(sk, o.sk_net).unwrap_or(0), o);
    }
}

/// `skb->dev`'s namespace (its inode) for a tc program, whose context pointer is the kernel's
/// `struct sk_buff *`. The pointer is copied through the stack with a probe read so that the
/// verifier sees a plain number, not a context pointer moved by a run-time offset. 0 if unknown.
#[inline(always)]
pub fn skb_dev_netns(ctx_ptr: u64, o: &KernelOffsets) -> u32 {
    let slot = ctx_ptr;
    // SAFETY: reads 8 bytes of this stack slot.
    let Ok(skb) = (unsafe { bpf_probe_read_kernel(&slot as *const u64) }) else {
        return 0;
    };
    let dev = read::<u64>(skb, o.skb_dev).unwrap_or(0);
    if dev == 0 {
        return 0;
    }
    net_inum(read::<u64>(dev, o.dev_nd_net).unwrap_or(0), o)
}

/// Does `skb` carry an IPv4 or IPv6 packet (network header set)? What [`skb_headers`] checks
/// first, for callers that need no more.
#[inline(always)]
pub fn skb_is_ip(skb: u64, o: &KernelOffsets) -> bool {
    let (Ok(head), Ok(nh)) = (
        read::<u64>(skb, o.skb_head),
        read::<u16>(skb, o.skb_network_header),
    ) else {
        return false;
    };
    head != 0
        && nh != 0xffff
        && matches!(read::<u8>(head + nh as u64, 0).map(|b| b >> 4), Ok(4 | 6))
}

/// Parses the IP and transport headers of `skb` into `ev`. Returns false for what netprobe does
/// not trace (non-IP, non-TCP/UDP/ICMP, non-first fragments).
#[inline(always)]
pub fn skb_headers(skb: u64, ev: &mut RawEvent, o: &KernelOffsets) -> bool {
    let Ok(head) = read::<u64>(skb, o.skb_head) else {
        return false;
    };
    let Ok(nh) = read::<u16>(skb, o.skb_network_header) else {
        return false;
    };
    // 0xffff means "not set" in the kernel (skb_network_header_was_set).
    if head == 0 || nh == 0xffff {
        return false;
    }
    let ip = head + nh as u64;
    let Ok(first) = read::<u8>(ip, 0) else {
        return false;
    };
    let ip_len;
    let l4 = match first >> 4 {
        4 => {
            let Ok(frag) = read::<u16>(ip, 6) else {
                return false;
            };
            if u16::from_be(frag) & 0x1fff != 0 {
                return false;
            }
            ev.family = AF_INET;
            ip_len = u16::from_be(read::<u16>(ip, 2).unwrap_or(0)) as u32;
            ev.proto = read::<u8>(ip, 9).unwrap_or(0);
            if let Ok(a) = read::<[u8; 4]>(ip, 12) {
                ev.saddr[..4].copy_from_slice(&a);
            }
            if let Ok(a) = read::<[u8; 4]>(ip, 16) {
                ev.daddr[..4].copy_from_slice(&a);
            }
            ip + ((first & 0x0f) as u64) * 4
        }
        6 => {
            ev.family = AF_INET6;
            ip_len = u16::from_be(read::<u16>(ip, 4).unwrap_or(0)) as u32 + 40;
            // Extension headers are not walked: TCP/UDP/ICMPv6 directly after the fixed header.
            ev.proto = read::<u8>(ip, 6).unwrap_or(0);
            ev.saddr = read::<[u8; 16]>(ip, 8).unwrap_or([0; 16]);
            ev.daddr = read::<[u8; 16]>(ip, 24).unwrap_or([0; 16]);
            ip + 40
        }
        _ => return false,
    };
    match ev.proto {
        IPPROTO_TCP => {
            ev.sport = u16::from_be(read::<u16>(l4, 0).unwrap_or(0));
            ev.dport = u16::from_be(read::<u16>(l4, 2).unwrap_or(0));
            ev.seq = u32::from_be(read::<u32>(l4, 4).unwrap_or(0));
            ev.tcp_flags = read::<u8>(l4, 13).unwrap_or(0);
            ev.aux = ip_len;
            true
        }
        IPPROTO_UDP => {
            ev.sport = u16::from_be(read::<u16>(l4, 0).unwrap_or(0));
            ev.dport = u16::from_be(read::<u16>(l4, 2).unwrap_or(0));
            ev.aux = ip_len;
            true
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            icmp_quoted(l4, ev);
            true
        }
        _ => false,
    }
}

/// An ICMP "destination unreachable" (fragmentation needed included) or ICMPv6 "destination
/// unreachable"/"packet too big" at `l4`: the tuple becomes the quoted packet's, so the error
/// matches the connection it answers (as the tc programs report it), `aux` its type and code.
/// Other ICMP keeps its zero ports.
#[inline(always)]
fn icmp_quoted(l4: u64, ev: &mut RawEvent) {
    let icmp_type = read::<u8>(l4, 0).unwrap_or(0);
    let code = read::<u8>(l4, 1).unwrap_or(0);
    let quoted = l4 + 8;
    let inner_l4 = if ev.proto == IPPROTO_ICMP {
        if icmp_type != 3 {
            return;
        }
        let Ok(vihl) = read::<u8>(quoted, 0) else {
            return;
        };
        if let Ok(a) = read::<[u8; 4]>(quoted, 12) {
            ev.saddr[..4].copy_from_slice(&a);
        }
        if let Ok(a) = read::<[u8; 4]>(quoted, 16) {
            ev.daddr[..4].copy_from_slice(&a);
        }
        quoted + ((vihl & 0x0f) as u64) * 4
    } else {
        if icmp_type != 1 && icmp_type != 2 {
            return;
        }
        ev.saddr = read::<[u8; 16]>(quoted, 8).unwrap_or([0; 16]);
        ev.daddr = read::<[u8; 16]>(quoted, 24).unwrap_or([0; 16]);
        quoted + 40
    };
    ev.sport = u16::from_be(read::<u16>(inner_l4, 0).unwrap_or(0));
    ev.dport = u16::from_be(read::<u16>(inner_l4, 2).unwrap_or(0));
    ev.aux = ((icmp_type as u32) << 8) | code as u32;
}

/// Fills family, addresses, ports, netns and state (in `aux`) from a `struct sock *`.
/// Returns false for non-IP sockets.
#[inline(always)]
pub fn sock_tuple(sk: u64, ev: &mut RawEvent, o: &KernelOffsets) -> bool {
    let family = read::<u16>(sk, o.sk_family).unwrap_or(0) as u8;
    match family {
        AF_INET => {
            if let Ok(a) = read::<[u8; 4]>(sk, o.sk_rcv_saddr) {
                ev.saddr[..4].copy_from_slice(&a);
            }
            if let Ok(a) = read::<[u8; 4]>(sk, o.sk_daddr) {
                ev.daddr[..4].copy_from_slice(&a);
            }
        }
        AF_INET6 => {
            ev.saddr = read::<[u8; 16]>(sk, o.sk_v6_rcv_saddr).unwrap_or([0; 16]);
            ev.daddr = read::<[u8; 16]>(sk, o.sk_v6_daddr).unwrap_or([0; 16]);
        }
        _ => return false,
    }
    ev.family = family;
    ev.sk = sk;
    ev.sport = read::<u16>(sk, o.sk_num).unwrap_or(0);
    ev.dport = u16::from_be(read::<u16>(sk, o.sk_dport).unwrap_or(0));
    ev.proto = read::<u16>(sk, o.sk_protocol).unwrap_or(0) as u8;
    ev.netns = net_inum(read::<u64>(sk, o.sk_net).unwrap_or(0), o);
    true
}

#[inline(always)]
pub fn sock_state(sk: u64, o: &KernelOffsets) -> u32 {
    read::<u8>(sk, o.sk_state).unwrap_or(0) as u32
}
