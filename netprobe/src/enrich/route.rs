//! What lies beyond this node for a destination: the route (`ip route get`) and its device,
//! with the overlay's encapsulation (VXLAN, IPIP) and the underlay device it rides on.

use std::net::IpAddr;

use crate::{
    error::Result,
    model::{Encap, RouteHint},
    netlink,
};

/// The route the calling thread's namespace uses toward `dst`; `None` when there is none.
pub fn route_hint(dst: IpAddr) -> Result<Option<RouteHint>> {
    let Some(route) = netlink::route_to(dst)? else {
        return Ok(None);
    };
    let links = netlink::links()?;
    let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
    let Some(link) = route.oif.and_then(|i| links.iter().find(|l| l.index == i)) else {
        return Ok(None);
    };
    let remote = match (&link.tunnel, link.kind.as_deref()) {
        (Some(t), _) if t.remote.is_some() => t.remote,
        (Some(_), Some("vxlan")) => route
            .gateway
            .and_then(|gw| vxlan_remote(link.index, gw).ok().flatten()),
        _ => None,
    };
    Ok(Some(RouteHint {
        dst,
        dev: link.name.clone(),
        kind: link.kind.clone(),
        mtu: link.mtu,
        gateway: route.gateway,
        encap: link.tunnel.as_ref().map(|t| Encap {
            kind: link.kind.clone().unwrap_or_default(),
            vni: t.vni,
            port: t.port,
            underlay: t.underlay.and_then(name_of),
            local: t.local,
            remote,
        }),
    }))
}

/// The remote VTEP a VXLAN device sends a next hop's packets to, the way Flannel programs it:
/// the next hop's MAC (neighbour entry on the device), then that MAC's FDB entry (its `dst`).
fn vxlan_remote(ifindex: u32, gateway: IpAddr) -> Result<Option<IpAddr>> {
    let family = match gateway {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let Some(mac) = netlink::neighbours(family)?
        .into_iter()
        .find(|n| n.ifindex == ifindex && n.dst == Some(gateway))
        .and_then(|n| n.lladdr)
    else {
        return Ok(None);
    };
    Ok(netlink::neighbours(libc::AF_BRIDGE as u8)?
        .into_iter()
        .find(|n| n.ifindex == ifindex && n.lladdr.as_ref() == Some(&mac))
        .and_then(|n| n.dst))
}
