//! What an Event says beyond its note: the structured details of the failure as annotations
//! (`netprobe.io/…`), written by the agent and read back by `kubectl netprobe failures`, so
//! that no reader parses the note.

use std::{collections::BTreeMap, net::IpAddr};

use super::Side;
use crate::{
    cluster::failures::{GroupKey, Party, RuleRef},
    model::Outcome,
    verdict::Verdict,
};

/// The Events' `reportingController`: what `failures` selects them by.
pub const CONTROLLER: &str = "netprobe.io/agent";

pub const SIDE: &str = "netprobe.io/side";
pub const OUTCOME: &str = "netprobe.io/outcome";
pub const CLIENT_NAMESPACE: &str = "netprobe.io/client-namespace";
/// The client's workload (`Deployment/x`), else `Pod/x`, else [`EXTERNAL`].
pub const CLIENT: &str = "netprobe.io/client";
/// The client's address (of the Event's first failure when the client is [`EXTERNAL`]).
pub const CLIENT_ADDRESS: &str = "netprobe.io/client-address";
pub const DESTINATION_NAMESPACE: &str = "netprobe.io/destination-namespace";
/// The Service dialled (`Service/x`), else the server's workload, pod or [`EXTERNAL`].
pub const DESTINATION: &str = "netprobe.io/destination";
pub const SERVER_NAMESPACE: &str = "netprobe.io/server-namespace";
/// The server's workload, else `Pod/x`, else [`EXTERNAL`].
pub const SERVER: &str = "netprobe.io/server";
/// `namespace/name` of the Service dialled.
pub const SERVICE: &str = "netprobe.io/service";
/// The port dialled (the Service port for a ClusterIP).
pub const PORT: &str = "netprobe.io/port";
pub const RULE_OWNER: &str = "netprobe.io/rule-owner";
pub const RULE_TABLE: &str = "netprobe.io/rule-table";
pub const RULE_CHAIN: &str = "netprobe.io/rule-chain";
pub const RULE_POSITION: &str = "netprobe.io/rule-position";
/// Policies in force (`namespace/name`, comma-separated).
pub const POLICIES: &str = "netprobe.io/policies";
/// The node whose agent wrote the Event.
pub const NODE: &str = "netprobe.io/node";

/// A side the agent cannot name (no pod, Service or workload of the cluster): its address is
/// not part of the Event's key, so spoofed addresses share one Event.
pub const EXTERNAL: &str = "external";

fn party(p: Party) -> Party {
    match (&p.namespace, p.name.parse::<IpAddr>()) {
        (None, Ok(_)) => Party {
            namespace: None,
            name: EXTERNAL.into(),
        },
        _ => p,
    }
}

/// The annotations of the Event about `side` of `v`, written on `node`.
pub fn annotations(v: &Verdict, side: Side, node: Option<&str>) -> BTreeMap<String, String> {
    let key = crate::cluster::memory::key_of(v);
    let mut a = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            a.insert(k.to_string(), v);
        }
    };
    let side = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    put(SIDE, Some(side.into()));
    put(OUTCOME, Some(outcome_name(v.outcome)));
    let client = party(key.client);
    put(CLIENT_NAMESPACE, client.namespace);
    put(CLIENT, Some(client.name));
    put(CLIENT_ADDRESS, Some(v.client.addr.to_string()));
    let destination = party(key.destination);
    put(DESTINATION_NAMESPACE, destination.namespace);
    put(DESTINATION, Some(destination.name));
    let server = party(crate::cluster::memory::endpoint_party(&v.server));
    put(SERVER_NAMESPACE, server.namespace);
    put(SERVER, Some(server.name));
    put(SERVICE, crate::sinks::prometheus::failed::service(v));
    put(PORT, Some(key.port.to_string()));
    if let Some(r) = key.rule {
        put(RULE_OWNER, Some(r.owner));
        put(RULE_TABLE, Some(r.table));
        put(RULE_CHAIN, Some(r.chain));
        put(RULE_POSITION, r.position.map(|p| p.to_string()));
        put(
            POLICIES,
            (!r.policies.is_empty()).then(|| r.policies.join(",")),
        );
    }
    put(NODE, node.map(str::to_string));
    a
}

/// `dropped_by_rule`: the outcome as the JSON names it.
pub fn outcome_name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The failure group an Event's annotations describe (None: not an Event of this schema).
pub fn group_key(a: &BTreeMap<String, String>) -> Option<GroupKey> {
    let get = |k: &str| a.get(k).cloned();
    let outcome = serde_json::from_value(serde_json::Value::String(get(OUTCOME)?)).ok()?;
    let rule = get(RULE_CHAIN).map(|chain| RuleRef {
        owner: get(RULE_OWNER).unwrap_or_default(),
        policies: get(POLICIES)
            .map(|p| p.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        table: get(RULE_TABLE).unwrap_or_default(),
        chain,
        position: get(RULE_POSITION).and_then(|p| p.parse().ok()),
    });
    Some(GroupKey {
        client: Party {
            namespace: get(CLIENT_NAMESPACE),
            name: get(CLIENT)?,
        },
        destination: Party {
            namespace: get(DESTINATION_NAMESPACE),
            name: get(DESTINATION)?,
        },
        port: get(PORT)?.parse().ok()?,
        outcome,
        rule,
    })
}

/// Which side of the failure an Event is about.
pub fn side(a: &BTreeMap<String, String>) -> Option<Side> {
    match a.get(SIDE).map(String::as_str) {
        Some("client") => Some(Side::Client),
        Some("server") => Some(Side::Server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::prometheus::failed::testing::{refused_no_listener, s1_calico};

    #[test]
    fn the_annotations_name_both_sides_the_service_the_rule_and_read_back_as_the_group() {
        let v = s1_calico();
        let a = annotations(&v, Side::Server, Some("node-a"));
        let get = |k: &str| a.get(k).map(String::as_str);
        assert_eq!(get(OUTCOME), Some("dropped_by_rule"));
        assert_eq!(get(CLIENT), Some("Deployment/baseline-predictor"));
        assert_eq!(get(CLIENT_NAMESPACE), Some("financial-inference"));
        assert_eq!(get(DESTINATION), Some("Service/seldon-scheduler"));
        assert_eq!(get(SERVER), Some("StatefulSet/seldon-scheduler"));
        assert_eq!(get(SERVICE), Some("financial-inference/seldon-scheduler"));
        assert_eq!(get(PORT), Some("9004"));
        assert_eq!(get(RULE_OWNER), Some("calico"));
        assert_eq!(get(RULE_POSITION), Some("5"));
        assert_eq!(
            get(POLICIES),
            Some("financial-inference/scheduler-allow-xds")
        );
        assert_eq!((get(SIDE), get(NODE)), (Some("server"), Some("node-a")));
        assert_eq!(side(&a), Some(Side::Server));
        let mut key = crate::cluster::memory::key_of(&v);
        assert_eq!(group_key(&a), Some(key.clone()));
        // A client the agent cannot name is `external`, whatever its address.
        let mut unknown = refused_no_listener();
        unknown.client.peer = None;
        let a = annotations(&unknown, Side::Server, None);
        assert_eq!(a[CLIENT], EXTERNAL);
        assert_eq!(a[CLIENT_ADDRESS], unknown.client.addr.to_string());
        assert!(!a.contains_key(CLIENT_NAMESPACE) && !a.contains_key(NODE));
        assert_eq!(group_key(&a).unwrap().client.name, EXTERNAL);
        // Not this schema: no group.
        key.port = 1;
        assert_eq!(group_key(&BTreeMap::new()), None);
    }
}
