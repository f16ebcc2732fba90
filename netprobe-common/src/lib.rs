//! `#[repr(C)]` types that cross the kernel/userspace boundary.
//!
//! Rules (so that both sides agree byte for byte): fixed-width integers only, no `bool` and no Rust
//! enums on the wire, explicit `_pad` fields, and a size assert per type. Event kinds have explicit
//! discriminants; retired values leave holes and are never reused.
#![no_std]

use core::mem::size_of;

/// What produced a [`RawEvent`].
pub mod kind {
    /// tc classifier, ingress of the interface in `ifindex`.
    pub const TC_INGRESS: u8 = 1;
    /// tc classifier, egress of the interface in `ifindex`.
    pub const TC_EGRESS: u8 = 2;
    /// `skb:kfree_skb`: a packet was dropped; `reason` is `enum skb_drop_reason`.
    pub const DROP: u8 = 3;
    /// `tcp:tcp_send_reset`: the kernel sent an RST; `reason` is `enum sk_rst_reason` (or 0).
    pub const SEND_RESET: u8 = 4;
    /// `tcp:tcp_receive_reset`: a socket received an RST.
    pub const RECEIVE_RESET: u8 = 5;
    /// `tcp:tcp_retransmit_skb`: a segment was retransmitted; `aux` is the TCP state.
    pub const RETRANSMIT: u8 = 6;
    /// `sock:inet_sock_set_state`: `aux` old state, `reason` new state.
    pub const STATE_CHANGE: u8 = 7;
    /// `sock:inet_sk_error_report`: `reason` is the errno the application sees.
    pub const SOCK_ERROR: u8 = 8;
    /// `fib:fib_table_lookup` failed (or hit a non-unicast route) for a connect() or send of a
    /// task in a watched namespace, before any packet existed: `reason` is the lookup's errno
    /// (positive; EAGAIN: that table had no route), `aux` the table id, `sport` 0 for a socket
    /// without a port yet.
    pub const ROUTE_FAILED: u8 = 9;
    /// Highest kind value in use (sizes per-kind counter arrays).
    pub const MAX: u8 = 9;
}

/// Values of the `QUIET_REASONS` map (indexed by drop reason): which drops of that reason the
/// always-on agent counts without emitting.
pub mod quiet {
    /// Emit (the default).
    pub const NEVER: u8 = 0;
    /// Never emit: routine socket teardown (QUEUE_PURGE, SOCKET_CLOSE).
    pub const ALWAYS: u8 = 1;
    /// Do not emit TCP segments without SYN: teardown segments a TIME_WAIT socket consumes.
    pub const TCP_EXCEPT_SYN: u8 = 2;
}

/// TCP flag bits as they appear in byte 13 of the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// One observation from the kernel, written to the `EVENTS` ring buffer.
///
/// Addresses are in network byte order (IPv4 in the first 4 bytes), ports in host byte order.
/// For ICMP/ICMPv6 errors the tuple is the one of the packet quoted inside the error (so it matches
/// the connection it answers), `proto` is the ICMP protocol and `aux` is `type << 8 | code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `sk_buff` (0 if none): joins the observations of one packet.
    pub skb: u64,
    /// Kernel address of the `sock` (0 if none): joins the observations of one socket.
    pub sk: u64,
    /// Kernel code address of a drop (`kfree_skb` location), symbolized from `/proc/kallsyms`.
    pub location: u64,
    /// Inode of the network namespace (as `stat /proc/PID/ns/net` shows it); 0 if unknown.
    pub netns: u32,
    /// Interface index (in `netns`); 0 if unknown.
    pub ifindex: u32,
    /// Kind-specific: drop reason, RST reason, new TCP state, errno, or for a retransmit the
    /// segment's length (`end_seq - seq`).
    pub reason: u32,
    /// Kind-specific: old TCP state, ICMP type/code, a dropped TCP/UDP packet's IP length, the
    /// MSS option of a SYN passing a tc checkpoint.
    pub aux: u32,
    /// Thread group id of the current task (only meaningful in process context).
    pub pid: u32,
    /// TCP sequence number (host order) of the segment (a retransmit's too), 0 if none. For a
    /// TCP state change: the connection's `total_retrans` (segments it sent again so far).
    pub seq: u32,
    pub sport: u16,
    pub dport: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// IP protocol of the packet.
    pub proto: u8,
    /// TCP flags of the segment (see [`tcp_flags`]), 0 if none.
    pub tcp_flags: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `comm` of the current task (only meaningful in process context).
    pub comm: [u8; 16],
    /// DROP: the destination of the packet's conntrack entry in the original direction (network
    /// order, as `daddr`): the address the client dialled, before DNAT. Valid if `orig_known`.
    pub orig_daddr: [u8; 16],
    /// DROP: the destination port of that entry (host order).
    pub orig_dport: u16,
    /// 1: `orig_daddr`/`orig_dport` were read from the skb's conntrack entry.
    pub orig_known: u8,
    pub _pad2: [u8; 5],
}
const _: () = assert!(size_of::<RawEvent>() == 136);

/// The DNS port: UDP datagrams to or from it carry the start of their DNS message.
pub const DNS_PORT: u16 = 53;
/// Bytes of a DNS message kept in a [`RawDnsEvent`]: the header and the question of any
/// ordinary lookup (a 100-character name fits).
pub const DNS_CAPTURE: usize = 128;

/// A [`RawEvent`] of a UDP datagram to or from [`DNS_PORT`], followed by the first bytes of its
/// DNS message. A record of its own size in the same ring buffer: userspace tells the two
/// apart by length, and ordinary events stay 136 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDnsEvent {
    pub ev: RawEvent,
    /// Bytes of `payload` the kernel filled (≤ [`DNS_CAPTURE`]); the rest is not meaningful.
    pub len: u16,
    pub _pad: [u8; 6],
    pub payload: [u8; DNS_CAPTURE],
}
const _: () = assert!(size_of::<RawDnsEvent>() == 272);

/// The in-kernel filter. Zero fields match anything. Set once at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Either port of the tuple must equal this (host order); 0 = any.
    pub port: u16,
    /// 1: restrict tracepoint events to namespaces present in the `NETNS_FILTER` map.
    pub netns_enabled: u8,
    /// 0: no address filter; [`AF_INET`] / [`AF_INET6`]: either address must equal `addr`.
    pub addr_family: u8,
    /// 1 (always-on agent): emit only failure signals — drops, resets, socket errors,
    /// retransmits, RST and ICMP-unreachable packets — not SYNs or state changes, so healthy
    /// traffic costs no event at all.
    pub failures_only: u8,
    /// 0: the tc programs follow TCP (and ICMP errors), as always; [`IPPROTO_UDP`]: they also
    /// emit every UDP datagram matching port and address (UDP/DNS traces). In
    /// `failures_only` mode UDP to or from [`DNS_PORT`] is emitted whatever this says.
    pub proto: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Filter>() == 24);

/// Byte offsets of the kernel structure members the programs read, resolved at start from the
/// running kernel's BTF (Rust eBPF has no CO-RE relocations). `u16::MAX`-style "absent" values are
/// not used: a member the loader cannot resolve fails the load with a named error instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub dev_nd_net: u32,
    pub dev_ifindex: u32,
    pub net_ns_inum: u32,
    pub sk_net: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_family: u32,
    pub sk_state: u32,
    pub sk_err: u32,
    pub sk_protocol: u32,
    pub sk_err_soft: u32,
    /// `inet_connection_sock.icsk_retransmits` (a `u8`): retransmission timeouts since the
    /// last acknowledgement of new data; 0 for a fast retransmit or a loss probe.
    pub icsk_retransmits: u32,
    /// 1 if `tcp_send_reset` has the `enum sk_rst_reason` argument (6.10+).
    pub rst_has_reason: u32,
    /// `sk_buff.cb`: a TCP skb's `struct tcp_skb_cb` (`seq`, `end_seq` first) for retransmits.
    pub skb_cb: u32,
    /// `tcp_sock.total_retrans`: segments the connection sent again over its lifetime.
    pub tcp_total_retrans: u32,
    /// `inet_sock.inet_sport`: a closed socket's own port (`skc_num` is cleared when it closes).
    pub inet_sport: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 100);

/// Offsets the `fib_table_lookup` program reads (kept apart from [`KernelOffsets`]: each
/// program copies the structs it loads onto its 512-byte stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteOffsets {
    /// `struct flowi4` members.
    pub fl4_iif: u32,
    pub fl4_proto: u32,
    pub fl4_saddr: u32,
    pub fl4_daddr: u32,
    pub fl4_dport: u32,
    pub fl4_sport: u32,
    /// `task_struct.nsproxy` and `nsproxy.net_ns`: the current task's namespace.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
}
const _: () = assert!(size_of::<RouteOffsets>() == 32);

/// Where a packet's conntrack entry keeps the original destination (the drop program).
/// All zero on a kernel without conntrack: then no original destination is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackOffsets {
    /// `sk_buff._nfct`.
    pub skb_nfct: u32,
    /// In `struct nf_conn`: `tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u3` and `.dst.u.all`.
    pub ct_orig_daddr: u32,
    pub ct_orig_dport: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConntrackOffsets>() == 16);

/// Size of the drop-reason counter arrays: reasons at or above this are counted in the last slot.
pub const MAX_DROP_REASONS: u32 = 256;
/// Entries of the per-netns filter map.
pub const MAX_NETNS_FILTER: u32 = 4096;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const RING_BYTES: u32 = 1 << 22;

/// Slots of the per-CPU `COUNTERS` array (besides the per-reason drop arrays).
pub mod counter {
    /// Events that matched the filter but found the ring buffer full: lost, and counted here.
    pub const LOST: u32 = 0;
    /// Events written to the ring buffer.
    pub const EMITTED: u32 = 1;
    // 2: unused (once every packet the tc programs saw: a map update per packet that nothing
    // read).
    /// Data retransmits of connections still making progress (fast retransmits, loss probes,
    /// retransmits after a partial acknowledgement): counted, not emitted — a healthy bulk
    /// transfer has hundreds a second, and only a retransmission timeout says anything is wrong.
    pub const RETRANSMITS_COUNTED: u32 = 3;
    pub const MAX: u32 = 4;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: `#[repr(C)]`, fixed-width fields, no implicit padding (size asserts).
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::RawDnsEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::RouteOffsets {}
    unsafe impl aya::Pod for super::ConntrackOffsets {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn raw_event_layout_is_stable() {
        // The decoder and any recorded fixture depend on these exact offsets.
        assert_eq!(offset_of!(RawEvent, netns), 32);
        assert_eq!(offset_of!(RawEvent, sport), 56);
        assert_eq!(offset_of!(RawEvent, kind), 60);
        assert_eq!(offset_of!(RawEvent, saddr), 64);
        assert_eq!(offset_of!(RawEvent, comm), 96);
        // Appended for the conntrack original destination of a drop.
        assert_eq!(offset_of!(RawEvent, orig_daddr), 112);
        assert_eq!(offset_of!(RawEvent, orig_dport), 128);
        assert_eq!(offset_of!(RawEvent, orig_known), 130);
        assert_eq!(core::mem::align_of::<RawEvent>(), 8);
    }

    #[test]
    fn filter_layout_is_stable() {
        assert_eq!(offset_of!(Filter, proto), 5);
        assert_eq!(offset_of!(Filter, addr), 8);
    }

    #[test]
    fn dns_event_layout_is_stable() {
        assert_eq!(offset_of!(RawDnsEvent, ev), 0);
        assert_eq!(offset_of!(RawDnsEvent, len), 136);
        assert_eq!(offset_of!(RawDnsEvent, payload), 144);
        assert_eq!(core::mem::align_of::<RawDnsEvent>(), 8);
    }
}
