//! kube-proxy. iptables mode: `KUBE-…` chains, Service comments `<ns>/<svc>:<port> has no
//! endpoints` / `has no local endpoints`. nftables mode: `table ip kube-proxy`, fixed comments
//! on its drop and reject rules, and verdict-map elements commented with the Service name.

use super::has;
use crate::{
    attribution::Owner,
    attribution::rules::ruleset::{RuleRef, Ruleset},
    model::Cni,
};

const NFT_TABLE: &str = "kube-proxy";

/// kube-proxy iptables comment `<ns>/<svc>:<port> has no endpoints`.
fn service_of(comment: &str, suffix: &str) -> Option<String> {
    comment.strip_suffix(suffix).map(|s| s.trim().to_string())
}

fn service_owner(kind: &str, svc: String, explanation: String) -> Owner {
    let mut o = Owner::new(Cni::KubeProxy, kind, explanation);
    o.object = Some(svc);
    o
}

/// The owner of a kube-proxy rule recognised by its comments or its nft table.
pub fn owner(rs: &Ruleset, rule: &RuleRef, dst: Option<(std::net::IpAddr, u16)>) -> Option<Owner> {
    iptables_owner(rule).or_else(|| (rule.table == NFT_TABLE).then(|| nft_owner(rs, rule, dst)))
}

fn iptables_owner(rule: &RuleRef) -> Option<Owner> {
    rule.comments.iter().find_map(|c| {
        if let Some(svc) = service_of(c, " has no endpoints") {
            let why = format!(
                "Service {svc} has no ready endpoints; kube-proxy rejects connections to it"
            );
            return Some(service_owner("kube-proxy-no-endpoints", svc, why));
        }
        let svc = service_of(c, " has no local endpoints")?;
        let why = format!(
            "Service {svc} has externalTrafficPolicy/internalTrafficPolicy Local and no endpoint on this node; kube-proxy drops"
        );
        Some(service_owner("kube-proxy-no-local-endpoints", svc, why))
    })
}

fn nft_owner(rs: &Ruleset, rule: &RuleRef, dst: Option<(std::net::IpAddr, u16)>) -> Owner {
    if has(rule, "Drop traffic to unallocated ClusterIPs") {
        return Owner::new(
            Cni::KubeProxy,
            "kube-proxy-unallocated-clusterip",
            "No Service owns this ClusterIP; kube-proxy drops".into(),
        );
    }
    if has(rule, "Reject traffic to invalid ports of ClusterIPs") {
        return Owner::new(
            Cni::KubeProxy,
            "kube-proxy-invalid-port",
            "The Service behind this ClusterIP does not expose this port; kube-proxy rejects"
                .into(),
        );
    }
    let svc = dst.and_then(|d| nft_service(rs, rule, d));
    let mut o = Owner::new(
        Cni::KubeProxy,
        "kube-proxy-no-endpoints",
        format!(
            "Service {} has no ready endpoints; kube-proxy (nftables mode) refuses connections to it",
            svc.as_deref().unwrap_or("(unknown)")
        ),
    );
    o.object = svc;
    o
}

/// Verdict maps keep the Service name in the element comment: `ip . proto . port comment "ns/svc:port"`.
fn nft_service(
    rs: &Ruleset,
    rule: &RuleRef,
    (ip, port): (std::net::IpAddr, u16),
) -> Option<String> {
    let sets = &rs.table(&rule.family, &rule.table)?.sets_text;
    let needle = format!("{ip} . tcp . {port} comment \"");
    let i = sets.find(&needle)? + needle.len();
    Some(sets[i..].split('"').next()?.to_string())
}

/// Any other rule in a `KUBE-` chain (asked after the CNIs: kube-router's chains are `KUBE-` too).
pub fn owner_by_chain(rule: &RuleRef) -> Option<Owner> {
    let chain = &rule.chain;
    (chain.starts_with("KUBE-") || chain.starts_with("kube-")).then(|| {
        Owner::new(
            Cni::KubeProxy,
            "kube-proxy-rule",
            format!("kube-proxy rule in {chain}"),
        )
    })
}

pub fn next_step(o: &Owner) -> String {
    format!(
        "check the Service's endpoints: kubectl get endpointslices{}",
        o.object
            .as_ref()
            .map(|o| format!(" for {o}"))
            .unwrap_or_default()
    )
}
