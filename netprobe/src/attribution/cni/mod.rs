//! Each CNI's (and kube-proxy's) knowledge in one module: chain names and prefixes, comment
//! formats, owner translation, interface naming, explanations and next steps. Formats from
//! `shared/reference/` (Calico 3.2x–3.3x, kube-proxy iptables and nft modes, kube-router in
//! k3s, Flannel). To teach netprobe another system, add a module here and ask it in
//! [`owner_of`], [`next_step`] and [`whose_pod`].

pub mod calico;
pub mod flannel;
pub mod kube_proxy;
pub mod kube_router;

use super::Owner;
pub use crate::model::Cni;
use crate::{
    attribution::rules::{Netfilter, RuleRef, Ruleset},
    model::OwnerSystem,
};

/// Which end of the flow a rule polices: the pod whose policies to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

fn has(r: &RuleRef, needle: &str) -> bool {
    r.comments.iter().any(|c| c.contains(needle))
}

/// The owner of the rule that dropped or rejected a packet (`dst`: the packet's destination,
/// for Services named by address).
pub fn owner_of(rs: &Ruleset, rule: &RuleRef, dst: Option<(std::net::IpAddr, u16)>) -> Owner {
    let mut owner = calico::owner(rs, rule)
        .or_else(|| kube_proxy::owner(rs, rule, dst))
        .or_else(|| kube_router::owner(rs, rule))
        .or_else(|| flannel::owner(rule))
        .or_else(|| kube_proxy::owner_by_chain(rule))
        .unwrap_or_else(|| user_owner(rule));
    if let OwnerSystem::Cni(cni) = owner.system {
        let engines = policy_engines(rs);
        if engines.len() > 1 && engines.contains(&cni) {
            let names: Vec<&str> = engines.iter().map(Cni::as_str).collect();
            owner.add_note(&format!(
                " (two NetworkPolicy engines filter pod traffic on this node: {}; a flow must be admitted by each)",
                names.join(" and ")
            ));
            owner.policy_engines = engines;
        }
    }
    owner
}

/// The NetworkPolicy engines whose chains hold rules in this ruleset, in a fixed order. More
/// than one is a migration's leftover (k3s's kube-router controller beside Calico): a flow then
/// has to pass both, and the one the user no longer thinks about drops it.
pub fn policy_engines(rs: &Ruleset) -> Vec<Cni> {
    let nft = rs
        .tables
        .iter()
        .filter(|((_, t), _)| !t.starts_with(crate::attribution::rules::NETPROBE_TABLE_PREFIX))
        .flat_map(|(_, t)| t.chains.iter())
        .filter(|(_, c)| !c.handles.is_empty())
        .map(|(name, _)| name.as_str());
    let saved = rs
        .iptables
        .iter()
        .filter(|(_, rules)| !rules.is_empty())
        .map(|((_, _, chain), _)| chain.as_str());
    let chains: Vec<&str> = nft.chain(saved).collect();
    [
        (Cni::Calico, calico::enforces_policy as fn(&str) -> bool),
        (Cni::KubeRouter, kube_router::enforces_policy),
    ]
    .into_iter()
    .filter(|(_, enforces)| chains.iter().any(|c| enforces(c)))
    .map(|(cni, _)| cni)
    .collect()
}

fn user_owner(rule: &RuleRef) -> Owner {
    Owner::new(
        OwnerSystem::User,
        "user-rule",
        format!(
            "A rule not made by Calico, kube-proxy, kube-router or Flannel, in {} {} {}",
            rule.family, rule.table, rule.chain
        ),
    )
}

/// For a rule nobody known made (or a leftover of one).
const FIND_THE_AUTHOR: &str =
    "find out who installed this rule (a leftover of a previous CNI or manual change?)";

/// Whose pod the rule that decided polices.
pub fn whose_pod(nf: &Netfilter) -> Side {
    if calico::polices_source(&nf.chain) {
        Side::Source
    } else {
        Side::Destination
    }
}

/// What to check next about the rule's owner.
pub fn next_step(nf: &Netfilter) -> String {
    let step = owner_step(nf);
    if nf.owner.policy_engines.contains(&Cni::KubeRouter) {
        return format!("{}; {step}", kube_router::TWO_ENGINES_FIX);
    }
    step
}

fn owner_step(nf: &Netfilter) -> String {
    match nf.owner.system {
        OwnerSystem::Cni(Cni::Calico) => calico::next_step(&nf.owner, whose_pod(nf)),
        OwnerSystem::Cni(Cni::KubeProxy) => kube_proxy::next_step(&nf.owner),
        OwnerSystem::Cni(Cni::KubeRouter) => kube_router::next_step(),
        OwnerSystem::Cni(Cni::Flannel) | OwnerSystem::User => FIND_THE_AUTHOR.into(),
    }
}

/// The owner's explanation rendered from its fields (after the workload behind its interface
/// became known); None when the explanation does not depend on them.
pub fn explain(nf: &Netfilter) -> Option<String> {
    match nf.owner.system {
        OwnerSystem::Cni(Cni::Calico) => calico::explain(&nf.owner, &nf.chain),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
