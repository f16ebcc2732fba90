//! Where this node sends packets toward an address: the route and what its device is.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The route this node uses toward the server, and what the egress device is (for timeouts:
/// what lies beyond this node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RouteHint {
    pub dst: IpAddr,
    /// Output device (`ip route get` of this node).
    pub dev: String,
    /// Link kind: "vxlan", "ipip", "veth", … (none for physical devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Overlay encapsulation (VXLAN, IPIP) of `dev`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encap: Option<Encap>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Encap {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// VXLAN UDP port (Flannel 8472, Calico 4789).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The underlay device the encapsulated packets leave on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<IpAddr>,
    /// Where the encapsulated packets go: the device's fixed remote, or for Flannel's VXLAN the
    /// next hop's VTEP from the FDB (the other node's underlay address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<IpAddr>,
}
