//! The in-kernel filter, set by userspace at load time, so that an idle trace costs a few loads
//! and compares per packet and nothing reaches the ring buffer unless it matches.

use aya_ebpf::{Global, macros::map, maps::HashMap};
use netprobe_common::{DNS_PORT, Filter, IPPROTO_UDP, MAX_NETNS_FILTER};

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter {
    port: 0,
    netns_enabled: 0,
    addr_family: 0,
    failures_only: 0,
    proto: 0,
    _pad: [0; 2],
    addr: [0; 16],
});

/// Network namespaces (inode numbers) a trace is restricted to, when `FILTER.netns_enabled`.
#[map]
static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_NETNS_FILTER, 0);

/// Does the tuple match the port and address filter?
#[inline(always)]
pub fn tuple_matches(
    family: u8,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
) -> bool {
    let f = FILTER.load();
    if f.port != 0 && f.port != sport && f.port != dport {
        return false;
    }
    if f.addr_family != 0 {
        if f.addr_family != family {
            return false;
        }
        let n = if family == netprobe_common::AF_INET {
            4
        } else {
            16
        };
        if !prefix_eq(saddr, &f.addr, n) && !prefix_eq(daddr, &f.addr, n) {
            return false;
        }
    }
    true
}

#[inline(always)]
fn prefix_eq(a: &[u8; 16], b: &[u8; 16], n: usize) -> bool {
    let mut i = 0;
    while i < 16 {
        if i < n && a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Should the tc programs emit this UDP datagram (ports in host order)? Traces ask for UDP
/// explicitly; the always-on agent takes DNS only (modest volume; userspace pairs queries and
/// replies to find the unanswered ones).
#[inline(always)]
pub fn udp_wanted(sport: u16, dport: u16) -> bool {
    let f = FILTER.load();
    if f.failures_only != 0 {
        sport == DNS_PORT || dport == DNS_PORT
    } else {
        f.proto == IPPROTO_UDP
    }
}

/// Always-on mode: only failure signals are emitted.
#[inline(always)]
pub fn failures_only() -> bool {
    FILTER.load().failures_only != 0
}

/// Is this namespace in scope? Always true when the netns filter is off.
#[inline(always)]
pub fn netns_matches(netns: u32) -> bool {
    if FILTER.load().netns_enabled == 0 {
        return true;
    }
    // SAFETY: the value is only tested for presence, never read through.
    unsafe { NETNS_FILTER.get(netns) }.is_some()
}
