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
///
/// At most one test of packet data, whatever the filter: `FILTER` is a constant the verifier
/// knows, and each test of data against it split the verifier's walk of the rest of the program
/// (a byte-wise address compare took `tcp_receive_reset` past the 1M-instruction limit with
/// `--addr`). The differences are folded into one word without branches. The tests of `f`
/// alone are resolved by the verifier; they also keep the data out of a result it can decide
/// (an unfiltered field folded in would be marked precise, and equal states no longer pruned).
#[inline(always)]
pub fn tuple_matches(
    family: u8,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
) -> bool {
    let f = FILTER.load();
    let mut miss = 0;
    if f.port != 0 {
        let port = u64::from(f.port);
        miss |= nonzero(port ^ u64::from(sport)) & nonzero(port ^ u64::from(dport));
    }
    if f.addr_family != 0 {
        // An IPv4 address fills the first word.
        let rest = if f.addr_family == netprobe_common::AF_INET {
            0
        } else {
            u64::MAX
        };
        miss |= nonzero(u64::from(f.addr_family ^ family))
            | (nonzero(addr_diff(saddr, &f.addr, rest)) & nonzero(addr_diff(daddr, &f.addr, rest)));
    }
    miss == 0
}

/// 1 if `x` is not zero, else 0, computed without a branch. LLVM would turn the arithmetic back
/// into a compare (`x != 0`), which the BPF backend emits as a branch: `-x` goes through a
/// volatile stack slot so that it cannot tell.
#[inline(always)]
fn nonzero(x: u64) -> u64 {
    let neg = x.wrapping_neg();
    // SAFETY: reads the local just written.
    let neg = unsafe { core::ptr::read_volatile(&neg) };
    (x | neg) >> 63
}

/// The bits in which two addresses differ, folded into one word: the first 32-bit word always,
/// the other three under `rest_mask`.
#[inline(always)]
fn addr_diff(a: &[u8; 16], b: &[u8; 16], rest_mask: u64) -> u64 {
    let w = |x: &[u8; 16], i: usize| {
        u64::from(u32::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]))
    };
    let rest = (w(a, 4) ^ w(b, 4)) | (w(a, 8) ^ w(b, 8)) | (w(a, 12) ^ w(b, 12));
    (w(a, 0) ^ w(b, 0)) | (rest & rest_mask)
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
