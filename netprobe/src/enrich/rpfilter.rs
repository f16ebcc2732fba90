//! Reverse-path filtering behind an IP_RPFILTER drop: the `rp_filter` sysctls that apply to the
//! interface the packet came in on (the kernel takes the higher of `all` and the interface's)
//! and where the namespace routes the source instead. Read in the interface's namespace when
//! the drop is seen.

use std::{cell::RefCell, net::IpAddr, time::Duration};

use super::recent::Recent;
use crate::{model::RpFilter, netlink};

thread_local! {
    /// (netns, ifindex, source) → what was read.
    static RECENT: RefCell<Recent<(u64, u32, IpAddr), Option<RpFilter>>> =
        RefCell::new(Recent::new(Duration::from_secs(2), 256));
}

/// Reverse-path filtering on interface `ifindex` of namespace `netns` (inode) for packets from
/// `src`; None when the namespace or the interface is gone, or this second's reads are spent.
pub fn at_drop(netns: u64, ifindex: u32, src: IpAddr) -> Option<RpFilter> {
    RECENT
        .with_borrow_mut(|r| {
            r.get_or((netns, ifindex, src), || {
                crate::netns::by_inode(netns)?
                    .run(|| read(ifindex, src))
                    .ok()
                    .flatten()
            })
        })
        .flatten()
}

/// In the calling thread's namespace (/proc/sys/net is the opener's namespace).
fn read(ifindex: u32, src: IpAddr) -> Option<RpFilter> {
    let links = netlink::links().ok()?;
    let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
    let interface = name_of(ifindex)?;
    let sysctl = |dev: &str| -> u8 {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let route_back = netlink::route_to(src)
        .ok()
        .flatten()
        .and_then(|r| r.oif)
        .and_then(name_of);
    Some(RpFilter {
        all: sysctl("all"),
        iface: sysctl(&interface),
        interface,
        route_back,
    })
}
