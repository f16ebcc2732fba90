//! One side of an attempt, as verdicts and `dns_failure` events name it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Pod, container, node or Service behind the address (from the inventory, when available;
    /// fields it cannot name stay null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<super::Peer>,
}

impl Endpoint {
    /// An address and port with nothing else known yet.
    pub fn at(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            netns: None,
            process: None,
            pid: None,
            peer: None,
        }
    }
}
