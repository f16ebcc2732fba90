//! kube-router (k3s's network policy controller): its chain names change between versions,
//! so rules are recognised by their comments: `rule to REJECT traffic destined for POD
//! name:<pod> namespace: <ns>`, `run through nw policy <name>`, `rule to drop invalid state
//! for pod …`.

use crate::{
    attribution::Owner,
    attribution::rules::ruleset::{RuleRef, Ruleset},
    model::Cni,
};

const POD_REJECT: &str = "rule to REJECT traffic destined for POD name:";
const POLICY_JUMP: &str = "run through nw policy ";
const INVALID_STATE: &str = "rule to drop invalid state for pod";

/// The chains of kube-router's policy firewall: per-pod (`KUBE-POD-FW-`), per-policy
/// (`KUBE-NWPLCY-`) and the hooks' entry chains. Stable across the versions k3s ships, unlike
/// the rules' positions.
const POLICY_CHAINS: [&str; 5] = [
    "KUBE-POD-FW-",
    "KUBE-NWPLCY-",
    "KUBE-ROUTER-FORWARD",
    "KUBE-ROUTER-INPUT",
    "KUBE-ROUTER-OUTPUT",
];

/// Is this one of the chains through which kube-router enforces NetworkPolicies?
pub fn enforces_policy(chain: &str) -> bool {
    POLICY_CHAINS.iter().any(|p| chain.starts_with(p))
}

pub fn owner(rs: &Ruleset, rule: &RuleRef) -> Option<Owner> {
    rule.comments.iter().find_map(|c| {
        if let Some(rest) = c.strip_prefix(POD_REJECT) {
            return Some(policy_reject(rs, rule, rest));
        }
        c.starts_with(INVALID_STATE).then(|| {
            Owner::new(
                Cni::KubeRouter,
                "kube-router-ctstate-invalid",
                "kube-router drops packets conntrack considers INVALID".into(),
            )
        })
    })
}

/// `rest`: `<pod> namespace: <ns>`; the policies are the chain's `run through nw policy` jumps.
fn policy_reject(rs: &Ruleset, rule: &RuleRef, rest: &str) -> Owner {
    let (pod, ns) = rest
        .split_once(" namespace: ")
        .map(|(p, n)| (p.trim(), n.trim()))
        .unwrap_or((rest.trim(), "?"));
    let policies: Vec<String> = rs
        .rules_of(&rule.family, &rule.table, &rule.chain)
        .iter()
        .flat_map(|r| r.comments.clone())
        .filter_map(|c| {
            c.strip_prefix(POLICY_JUMP)
                .map(|p| format!("{ns}/{}", p.trim()))
        })
        .collect();
    let mut o = Owner::new(
        Cni::KubeRouter,
        "kube-router-policy-reject",
        format!(
            "NetworkPolicies select pod {ns}/{pod} and none admits this flow (k3s network policy controller){}",
            if policies.is_empty() {
                String::new()
            } else {
                format!(": {}", policies.join(", "))
            }
        ),
    );
    o.object = Some(format!("{ns}/{pod}"));
    o.policies = policies;
    o
}

/// The usual fix when kube-router's policy chains filter beside another engine's: on k3s the
/// embedded network policy controller keeps running after a migration to Calico unless told
/// not to.
pub const TWO_ENGINES_FIX: &str = "two NetworkPolicy engines enforce on this node (kube-router, k3s's embedded network policy controller, beside the CNI's): once the CNI enforces NetworkPolicies, start every k3s server with --disable-network-policy and remove kube-router's KUBE-ROUTER-*/KUBE-POD-FW-*/KUBE-NWPLCY-* chains (or reboot the nodes)";

pub fn next_step() -> String {
    "check the NetworkPolicies selecting the destination pod (k3s network policy controller)".into()
}
