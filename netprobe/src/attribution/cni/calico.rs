//! Calico (iptables and nft dataplanes): `cali-` chains (nft mode: `filter-cali-…` in
//! `table ip calico`), `cali:` rule comments, per-endpoint chains `cali-tw-<iface>` (to the
//! workload: its ingress policies) and `cali-fw-<iface>` (from it: egress), policy chains
//! `cali-pi-`/`cali-po-` (groups `cali-gi-`/`cali-go-`), and workload interfaces named
//! `cali` + sha1("<namespace>.<pod>")[:11].

use super::{Side, has};
use crate::{
    attribution::Owner,
    attribution::rules::ruleset::{RuleRef, Ruleset},
    model::Cni,
};

const TO_WORKLOAD: &str = "cali-tw-";
const FROM_WORKLOAD: &str = "cali-fw-";
const POLICY_CHAINS: [&str; 4] = ["cali-pi-", "cali-po-", "cali-gi-", "cali-go-"];
/// Egress policy chains: they police the packet's source.
const EGRESS_CHAINS: [&str; 2] = [FROM_WORKLOAD, "cali-po-"];

/// Is this rule Calico's?
pub fn owns(rule: &RuleRef) -> bool {
    rule.chain.contains("cali-")
        || rule.table == "calico"
        || rule.comments.iter().any(|c| c.starts_with("cali:"))
}

/// Is this one of the chains through which Calico enforces policy on workloads (per-endpoint or
/// policy chains)?
pub fn enforces_policy(chain: &str) -> bool {
    [TO_WORKLOAD, FROM_WORKLOAD]
        .iter()
        .chain(POLICY_CHAINS.iter())
        .any(|p| chain.contains(p))
}

/// Do the chain's policies belong to the packet's source (egress) rather than its destination?
pub fn polices_source(chain: &str) -> bool {
    EGRESS_CHAINS.iter().any(|p| chain.contains(p))
}

/// The workload interface of a per-endpoint chain.
fn iface_of(chain: &str) -> Option<String> {
    [TO_WORKLOAD, FROM_WORKLOAD]
        .iter()
        .find_map(|p| chain.find(p).map(|i| chain[i + p.len()..].to_string()))
}

/// Does `iface` (`cali` + a prefix of sha1("<namespace>.<pod>")) belong to that pod?
pub fn iface_is_pods(iface: &str, namespace: &str, pod: &str) -> bool {
    let Some(hex) = iface.strip_prefix("cali") else {
        return false;
    };
    sha1_smol::Sha1::from(format!("{namespace}.{pod}"))
        .digest()
        .to_string()
        .starts_with(hex)
}

/// Calico names a policy in the first rule of its `cali-pi-`/`cali-po-` chain:
/// `Policy ns/knp.default.name ingress` (≤3.31) or `KubernetesNetworkPolicy ns/name ingress` (3.32+).
pub fn policy_name(comment: &str) -> Option<String> {
    let c = comment.rsplit("; ").next().unwrap_or(comment).trim();
    let mut words = c.split_whitespace();
    let first = words.next()?;
    let name = words.next()?;
    let dir = words.next()?;
    if !matches!(dir, "ingress" | "egress") {
        return None;
    }
    let kinds = [
        "Policy",
        "NetworkPolicy",
        "GlobalNetworkPolicy",
        "KubernetesNetworkPolicy",
        "KubernetesClusterNetworkPolicy",
        "StagedNetworkPolicy",
        "StagedGlobalNetworkPolicy",
        "StagedKubernetesNetworkPolicy",
    ];
    if !kinds.contains(&first) {
        return None;
    }
    // `ns/knp.default.name` → `ns/name`; `ns/tier.name` → `ns/tier.name` is kept as Calico shows it.
    Some(match name.split_once("/knp.default.") {
        Some((ns, n)) => format!("{ns}/{n}"),
        None => name.to_string(),
    })
}

/// Policy chains a Calico endpoint chain jumps to, named by the first rule of each.
fn policies(rs: &Ruleset, family: &str, table: &str, chain: &str) -> Vec<String> {
    policies_at(rs, family, table, chain, 0)
}

/// Policy groups nest one level (cali-gi/go → cali-pi/po); a ruleset with deeper nesting or a
/// cycle (seen by the fuzzer: a chain jumping to itself) must not recurse without end.
const MAX_POLICY_NESTING: u32 = 2;

fn jump_target(r: &RuleRef) -> Option<String> {
    r.text
        .split_whitespace()
        .skip_while(|w| !matches!(*w, "-j" | "-g" | "jump" | "goto"))
        .nth(1)
        .map(str::to_string)
}

fn is_policy_chain(target: &str) -> bool {
    POLICY_CHAINS
        .iter()
        .any(|p| target.starts_with(p) || target.contains(&format!("-{p}")))
}

fn policies_at(rs: &Ruleset, family: &str, table: &str, chain: &str, depth: u32) -> Vec<String> {
    let mut out = Vec::new();
    for r in rs.rules_of(family, table, chain) {
        let Some(target) = jump_target(&r).filter(|t| is_policy_chain(t)) else {
            continue;
        };
        let mut named: Vec<String> = rs
            .first_rule_of(family, table, &target)
            .map(|first| {
                first
                    .comments
                    .iter()
                    .filter_map(|c| policy_name(c))
                    .collect()
            })
            .unwrap_or_default();
        if named.is_empty() && depth < MAX_POLICY_NESTING {
            // Policy groups (cali-gi/go) hold several policies: follow them down.
            named = policies_at(rs, family, table, &target, depth + 1);
        }
        if named.is_empty() {
            named.push(format!("(unnamed policy chain {target})"));
        }
        out.extend(named);
    }
    out.dedup();
    out
}

/// The owner of a Calico rule; None for rules that are not Calico's.
pub fn owner(rs: &Ruleset, rule: &RuleRef) -> Option<Owner> {
    if !owns(rule) {
        return None;
    }
    let chain = rule.chain.as_str();
    let iface = iface_of(chain);
    let with_iface = |mut o: Owner| {
        o.interface = iface.clone();
        o
    };
    if has(rule, "Drop if no policies passed packet")
        || has(rule, "Reject if no policies passed packet")
    {
        let mut o = with_iface(Owner::new(Cni::Calico, END_OF_TIER, String::new()));
        o.policies = policies(rs, &rule.family, &rule.table, chain);
        o.explanation = end_of_tier_explanation(&o, chain);
        return Some(o);
    }
    if has(rule, "Drop if no profiles matched") || has(rule, "Reject if no profiles matched") {
        return Some(with_iface(Owner::new(
            Cni::Calico,
            "calico-no-profile",
            "No Calico policy applies to this workload and no profile admitted the flow".into(),
        )));
    }
    if has(rule, "Unknown interface") {
        return Some(Owner::new(Cni::Calico, "calico-unknown-interface", "Calico does not know this workload interface (endpoint not programmed yet, or a leftover veth)".into()));
    }
    let text = rule.text.to_lowercase();
    if text.contains("ctstate invalid") || text.contains("ct state invalid") {
        return Some(with_iface(Owner::new(Cni::Calico, "calico-ctstate-invalid", "Calico drops packets conntrack considers INVALID (e.g. asymmetric routing, a SYN-ACK without SYN)".into())));
    }
    if text.contains("rpfilter") || text.contains("fib saddr") {
        return Some(Owner::new(Cni::Calico, "calico-rpfilter", "Calico's reverse-path check dropped the packet: its source is not reachable via the interface it came in on".into()));
    }
    Some(with_iface(Owner::new(
        Cni::Calico,
        "calico-rule",
        format!("Calico rule in {chain}"),
    )))
}

const END_OF_TIER: &str = "calico-end-of-tier-deny";

/// `Calico network policies select this workload (ingress to cali… = pod ns/name) but …`
fn end_of_tier_explanation(o: &Owner, chain: &str) -> String {
    let dir = if chain.contains(TO_WORKLOAD) {
        "ingress to"
    } else {
        "egress from"
    };
    let workload = match (&o.interface, &o.workload) {
        (Some(i), Some(pod)) => format!("{i} = pod {pod}"),
        (Some(i), None) => i.clone(),
        (None, _) => "?".into(),
    };
    let policies = if o.policies.is_empty() {
        "(no policy chain found)".to_string()
    } else {
        o.policies.join(", ")
    };
    format!(
        "Calico network policies select this workload ({dir} {workload}) but none of them admits this flow: {policies}{}",
        o.note
    )
}

/// The explanation of an owner whose text names its workload, rendered from its fields.
pub fn explain(o: &Owner, chain: &str) -> Option<String> {
    (o.kind == END_OF_TIER).then(|| end_of_tier_explanation(o, chain))
}

pub fn next_step(o: &Owner, whose: Side) -> String {
    format!(
        "check the Calico/Kubernetes NetworkPolicies selecting the {} pod{}",
        whose.as_str(),
        if o.policies.is_empty() {
            String::new()
        } else {
            format!(": {}", o.policies.join(", "))
        }
    )
}
