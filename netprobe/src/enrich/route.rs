//! What lies beyond this node for a destination: the route (`ip route get`) and its device,
//! with the overlay's encapsulation (VXLAN, IPIP) and the underlay device it rides on.

use std::net::IpAddr;

use crate::{
    error::Result,
    netlink,
    verdict::{Encap, RouteHint},
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
            remote: t.remote,
        }),
    }))
}
