//! Owner translation across the CNIs (moved from enrich/rules/owners.rs).
/// Found by the fuzzer: a Calico policy chain that jumps to itself made owner translation
/// recurse until the stack overflowed.
#[test]
fn a_policy_chain_cycle_does_not_recurse_forever() {
    // The fuzzer's input, run through what the fuzz target does.
    let text = String::from_utf8_lossy(include_bytes!(
        "../../../../fuzz/corpus/ruleset/regression-policy-cycle"
    ));
    let rs = Ruleset::from_outputs(&text, &text, "");
    let mut owners = 0;
    for ((family, table), t) in &rs.tables {
        for (chain, c) in &t.chains {
            for h in &c.handles {
                if let Some(rule) = rs.rule(family, table, chain, *h) {
                    let _ = owner_of(&rs, &rule, None);
                    owners += 1;
                }
            }
        }
    }
    assert!(owners > 0, "the input has rules");
}

use super::*;
use crate::attribution::rules::ruleset::{RuleRef, Ruleset};
use crate::model::OwnerSystem;

#[test]
fn calico_policy_names_across_versions() {
    assert_eq!(
        calico::policy_name("Policy financial-inference/knp.default.scheduler-allow-xds ingress")
            .as_deref(),
        Some("financial-inference/scheduler-allow-xds")
    );
    assert_eq!(
        calico::policy_name("KubernetesNetworkPolicy team-b/deny-from-other-ns ingress").as_deref(),
        Some("team-b/deny-from-other-ns")
    );
    assert_eq!(
        calico::policy_name("cali:abc; Policy ns/default.p egress").as_deref(),
        Some("ns/default.p")
    );
    assert_eq!(
        calico::policy_name("GlobalNetworkPolicy allow-dns egress").as_deref(),
        Some("allow-dns")
    );
    assert_eq!(calico::policy_name("Profile kns.default ingress"), None);
    assert_eq!(calico::policy_name("cali:wUHhoiAYhphO9Mso"), None);
}

fn rule(table: &str, chain: &str, text: &str, comments: &[&str]) -> RuleRef {
    RuleRef {
        family: "ip".into(),
        table: table.into(),
        chain: chain.into(),
        handle: 1,
        position: Some(1),
        text: text.into(),
        nft_text: None,
        comments: comments.iter().map(|c| c.to_string()).collect(),
    }
}

#[test]
fn kube_proxy_and_kube_router_and_user_rules() {
    let rs = Ruleset::default();
    let o = owner_of(
        &rs,
        &rule(
            "filter",
            "KUBE-SERVICES",
            "-A KUBE-SERVICES ... -j REJECT",
            &["financial-inference/seldon-scheduler:xds has no endpoints"],
        ),
        None,
    );
    assert_eq!(o.kind, "kube-proxy-no-endpoints");
    assert_eq!(
        o.object.as_deref(),
        Some("financial-inference/seldon-scheduler:xds")
    );
    let o = owner_of(
        &rs,
        &rule(
            "filter",
            "KUBE-POD-FW-ABC",
            "-j REJECT",
            &[
                "rule to REJECT traffic destined for POD name:seldon-scheduler-0 namespace: financial-inference",
            ],
        ),
        None,
    );
    assert_eq!(o.system, OwnerSystem::Cni(Cni::KubeRouter));
    assert_eq!(
        o.object.as_deref(),
        Some("financial-inference/seldon-scheduler-0")
    );
    let o = owner_of(
        &rs,
        &rule(
            "filter",
            "FORWARD",
            "-A FORWARD -p tcp --dport 9004 -j DROP",
            &[],
        ),
        None,
    );
    assert_eq!(o.kind, "user-rule");
    let o = owner_of(
        &rs,
        &rule("filter", "FLANNEL-FWD", "-j DROP", &["flanneld forward"]),
        None,
    );
    assert_eq!(o.system, OwnerSystem::Cni(Cni::Flannel));
    let o = owner_of(
        &rs,
        &rule(
            "kube-proxy",
            "cluster-ips-check",
            "drop",
            &["Drop traffic to unallocated ClusterIPs"],
        ),
        None,
    );
    assert_eq!(o.kind, "kube-proxy-unallocated-clusterip");
}

/// Calico's and kube-router's chains side by side (a migration that kept k3s's policy
/// controller): both engines are named on either's rules, with the k3s fix first; one engine
/// alone, or a rule of neither, is not called out.
#[test]
fn two_policy_engines_are_named_on_either_engines_rules() {
    use crate::attribution::Netfilter;
    let calico = netprobe_lab::rules::calico_filter("cali1234", "cali5678");
    let router = netprobe_lab::rules::kube_router_reject();
    let both = Ruleset::from_outputs("", &format!("{router}{calico}"), "");
    assert_eq!(policy_engines(&both), vec![Cni::Calico, Cni::KubeRouter]);
    let only_router = Ruleset::from_outputs("", &router, "");
    assert_eq!(policy_engines(&only_router), vec![Cni::KubeRouter]);

    let reject = rule(
        "filter",
        "KUBE-POD-FW-4HZJ5VQMYRPBZKTG",
        "-j REJECT --reject-with icmp-port-unreachable",
        &[
            "rule to REJECT traffic destined for POD name:seldon-scheduler-0 namespace: financial-inference",
        ],
    );
    let o = owner_of(&both, &reject, None);
    assert_eq!(o.system, OwnerSystem::Cni(Cni::KubeRouter));
    assert_eq!(o.policy_engines, vec![Cni::Calico, Cni::KubeRouter]);
    assert!(
        o.explanation.contains(
            "two NetworkPolicy engines filter pod traffic on this node: calico and kube-router"
        ),
        "{}",
        o.explanation
    );
    let nf = Netfilter {
        backend: crate::model::Backend::IptablesNft,
        family: "ip".into(),
        hook: Some("forward".into()),
        table: "filter".into(),
        chain: reject.chain.clone(),
        handle: Some(1),
        position: Some(1),
        rule: Some(reject.text.clone()),
        comments: reject.comments.clone(),
        action: crate::model::NfAction::Reject,
        client_sees: "connection refused".into(),
        path: Vec::new(),
        owner: o,
        evidence: Default::default(),
    };
    let step = next_step(&nf);
    assert!(
        step.starts_with("two NetworkPolicy engines enforce"),
        "{step}"
    );
    assert!(step.contains("--disable-network-policy"), "{step}");

    assert!(
        owner_of(&only_router, &reject, None)
            .policy_engines
            .is_empty()
    );
    let user = owner_of(&both, &rule("filter", "FORWARD", "-j DROP", &[]), None);
    assert!(
        user.policy_engines.is_empty(),
        "a user's rule is neither engine's"
    );
}
