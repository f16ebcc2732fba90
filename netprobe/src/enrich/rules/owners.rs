//! Who owns a netfilter rule: Calico, kube-proxy, kube-router, Flannel, or a person. Pure
//! functions over the rule that decided and the ruleset around it; formats from
//! `shared/reference/` (Calico 3.2x–3.3x, kube-proxy iptables and nft modes, kube-router in k3s).

use serde::{Deserialize, Serialize};

use super::ruleset::{RuleRef, Ruleset};

/// The Kubernetes (or other) object behind a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Owner {
    /// `calico`, `kube-proxy`, `kube-router`, `flannel`, `user`.
    pub system: String,
    /// What kind of rule it is, e.g. `calico-end-of-tier-deny`, `kube-proxy-no-endpoints`.
    pub kind: String,
    /// Policies in force (namespace/name) where the rule is a policy default deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// `namespace/name[:port]` of a Service, `namespace/pod` of a pod, when the rule names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Host-side interface of the workload, for Calico per-endpoint chains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `namespace/pod` behind that interface (from the inventory: Calico names it
    /// `cali` + sha1("<namespace>.<pod>")[:11]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// One sentence for a human.
    pub explanation: String,
}

fn has(r: &RuleRef, needle: &str) -> bool {
    r.comments.iter().any(|c| c.contains(needle))
}

/// Calico names a policy in the first rule of its `cali-pi-`/`cali-po-` chain:
/// `Policy ns/knp.default.name ingress` (≤3.31) or `KubernetesNetworkPolicy ns/name ingress` (3.32+).
pub fn calico_policy_name(comment: &str) -> Option<String> {
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
fn calico_policies(rs: &Ruleset, family: &str, table: &str, chain: &str) -> Vec<String> {
    calico_policies_at(rs, family, table, chain, 0)
}

/// Policy groups nest one level (cali-gi/go → cali-pi/po); a ruleset with deeper nesting or a
/// cycle (seen by the fuzzer: a chain jumping to itself) must not recurse without end.
const MAX_POLICY_NESTING: u32 = 2;

fn calico_policies_at(
    rs: &Ruleset,
    family: &str,
    table: &str,
    chain: &str,
    depth: u32,
) -> Vec<String> {
    let mut out = Vec::new();
    for r in rs.rules_of(family, table, chain) {
        let target = r
            .text
            .split_whitespace()
            .skip_while(|w| !matches!(*w, "-j" | "-g" | "jump" | "goto"))
            .nth(1)
            .map(str::to_string);
        let Some(target) = target else { continue };
        let is_policy = ["cali-pi-", "cali-po-", "cali-gi-", "cali-go-"]
            .iter()
            .any(|p| target.starts_with(p) || target.contains(&format!("-{p}")));
        if !is_policy {
            continue;
        }
        let first = rs.first_rule_of(family, table, &target);
        let mut named = false;
        if let Some(first) = first {
            for c in &first.comments {
                if let Some(n) = calico_policy_name(c) {
                    out.push(n);
                    named = true;
                }
            }
        }
        if !named && depth < MAX_POLICY_NESTING {
            // Policy groups (cali-gi/go) hold several policies: follow them down.
            for p in calico_policies_at(rs, family, table, &target, depth + 1) {
                out.push(p);
                named = true;
            }
        }
        if !named {
            out.push(format!("(unnamed policy chain {target})"));
        }
    }
    out.dedup();
    out
}

fn calico_iface(chain: &str) -> Option<String> {
    for p in ["cali-tw-", "cali-fw-"] {
        if let Some(i) = chain.find(p) {
            return Some(chain[i + p.len()..].to_string());
        }
    }
    None
}

/// kube-proxy iptables comment `<ns>/<svc>:<port> has no endpoints`.
fn kube_proxy_service(comment: &str, suffix: &str) -> Option<String> {
    comment.strip_suffix(suffix).map(|s| s.trim().to_string())
}

/// The owner of the rule that dropped or rejected a packet.
pub fn owner_of(rs: &Ruleset, rule: &RuleRef, dst: Option<(std::net::IpAddr, u16)>) -> Owner {
    let chain = rule.chain.as_str();
    let mk = |system: &str, kind: &str, explanation: String| Owner {
        system: system.into(),
        kind: kind.into(),
        policies: Vec::new(),
        object: None,
        interface: None,
        workload: None,
        explanation,
    };

    // Calico (iptables mode chains `cali-…`; nft mode `filter-cali-…` in `table ip calico`).
    let calico = chain.contains("cali-")
        || rule.table == "calico"
        || rule.comments.iter().any(|c| c.starts_with("cali:"));
    if calico {
        let iface = calico_iface(chain);
        if has(rule, "Drop if no policies passed packet")
            || has(rule, "Reject if no policies passed packet")
        {
            let policies = calico_policies(rs, &rule.family, &rule.table, chain);
            let dir = if chain.contains("cali-tw-") {
                "ingress to"
            } else {
                "egress from"
            };
            let mut o = mk(
                "calico",
                "calico-end-of-tier-deny",
                format!(
                    "Calico network policies select this workload ({dir} {}) but none of them admits this flow: {}",
                    iface.as_deref().unwrap_or("?"),
                    if policies.is_empty() {
                        "(no policy chain found)".to_string()
                    } else {
                        policies.join(", ")
                    }
                ),
            );
            o.policies = policies;
            o.interface = iface;
            return o;
        }
        if has(rule, "Drop if no profiles matched") || has(rule, "Reject if no profiles matched") {
            let mut o = mk(
                "calico",
                "calico-no-profile",
                "No Calico policy applies to this workload and no profile admitted the flow".into(),
            );
            o.interface = iface;
            return o;
        }
        if has(rule, "Unknown interface") {
            return mk("calico", "calico-unknown-interface", "Calico does not know this workload interface (endpoint not programmed yet, or a leftover veth)".into());
        }
        let text = rule.text.to_lowercase();
        if text.contains("ctstate invalid") || text.contains("ct state invalid") {
            let mut o = mk("calico", "calico-ctstate-invalid", "Calico drops packets conntrack considers INVALID (e.g. asymmetric routing, a SYN-ACK without SYN)".into());
            o.interface = iface;
            return o;
        }
        if text.contains("rpfilter") || text.contains("fib saddr") {
            return mk("calico", "calico-rpfilter", "Calico's reverse-path check dropped the packet: its source is not reachable via the interface it came in on".into());
        }
        let mut o = mk("calico", "calico-rule", format!("Calico rule in {chain}"));
        o.interface = iface;
        return o;
    }

    // kube-proxy, iptables mode.
    for c in &rule.comments {
        if let Some(svc) = kube_proxy_service(c, " has no endpoints") {
            let mut o = mk(
                "kube-proxy",
                "kube-proxy-no-endpoints",
                format!(
                    "Service {svc} has no ready endpoints; kube-proxy rejects connections to it"
                ),
            );
            o.object = Some(svc);
            return o;
        }
        if let Some(svc) = kube_proxy_service(c, " has no local endpoints") {
            let mut o = mk(
                "kube-proxy",
                "kube-proxy-no-local-endpoints",
                format!(
                    "Service {svc} has externalTrafficPolicy/internalTrafficPolicy Local and no endpoint on this node; kube-proxy drops"
                ),
            );
            o.object = Some(svc);
            return o;
        }
    }
    // kube-proxy, nftables mode (`table ip kube-proxy`).
    if rule.table == "kube-proxy" {
        if has(rule, "Drop traffic to unallocated ClusterIPs") {
            return mk(
                "kube-proxy",
                "kube-proxy-unallocated-clusterip",
                "No Service owns this ClusterIP; kube-proxy drops".into(),
            );
        }
        if has(rule, "Reject traffic to invalid ports of ClusterIPs") {
            return mk(
                "kube-proxy",
                "kube-proxy-invalid-port",
                "The Service behind this ClusterIP does not expose this port; kube-proxy rejects"
                    .into(),
            );
        }
        // Verdict maps keep the Service name in the element comment: `ip . proto . port comment "ns/svc:port"`.
        let svc = dst.and_then(|(ip, port)| {
            let sets = &rs.table(&rule.family, &rule.table)?.sets_text;
            let needle = format!("{ip} . tcp . {port} comment \"");
            let i = sets.find(&needle)? + needle.len();
            Some(sets[i..].split('"').next()?.to_string())
        });
        let mut o = mk(
            "kube-proxy",
            "kube-proxy-no-endpoints",
            format!(
                "Service {} has no ready endpoints; kube-proxy (nftables mode) refuses connections to it",
                svc.as_deref().unwrap_or("(unknown)")
            ),
        );
        o.object = svc;
        return o;
    }

    // kube-router (k3s's network policy controller): key on comments, chain names change.
    for c in &rule.comments {
        if let Some(rest) = c.strip_prefix("rule to REJECT traffic destined for POD name:") {
            let (pod, ns) = rest
                .split_once(" namespace: ")
                .map(|(p, n)| (p.trim(), n.trim()))
                .unwrap_or((rest.trim(), "?"));
            let policies: Vec<String> = rs
                .rules_of(&rule.family, &rule.table, chain)
                .iter()
                .flat_map(|r| r.comments.clone())
                .filter_map(|c| {
                    c.strip_prefix("run through nw policy ")
                        .map(|p| format!("{ns}/{}", p.trim()))
                })
                .collect();
            let mut o = mk(
                "kube-router",
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
            return o;
        }
        if c.starts_with("rule to drop invalid state for pod") {
            return mk(
                "kube-router",
                "kube-router-ctstate-invalid",
                "kube-router drops packets conntrack considers INVALID".into(),
            );
        }
    }

    if chain.starts_with("FLANNEL") || rule.table.starts_with("flannel") {
        return mk(
            "flannel",
            "flannel-leftover",
            format!("Flannel rule in {chain}: a leftover if the cluster no longer runs Flannel"),
        );
    }
    if chain.starts_with("KUBE-") || chain.starts_with("kube-") {
        return mk(
            "kube-proxy",
            "kube-proxy-rule",
            format!("kube-proxy rule in {chain}"),
        );
    }
    mk(
        "user",
        "user-rule",
        format!(
            "A rule not made by Calico, kube-proxy, kube-router or Flannel, in {} {} {chain}",
            rule.family, rule.table
        ),
    )
}

#[cfg(test)]
mod tests {

    /// Found by the fuzzer: a Calico policy chain that jumps to itself made owner translation
    /// recurse until the stack overflowed.
    #[test]
    fn a_policy_chain_cycle_does_not_recurse_forever() {
        // The fuzzer's input, run through what the fuzz target does.
        let text = String::from_utf8_lossy(include_bytes!(
            "../../../../fuzz/corpus/ruleset/regression-policy-cycle"
        ));
        let rs = super::super::ruleset::Ruleset::from_outputs(&text, &text, "");
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

    #[test]
    fn calico_policy_names_across_versions() {
        assert_eq!(
            calico_policy_name(
                "Policy financial-inference/knp.default.scheduler-allow-xds ingress"
            )
            .as_deref(),
            Some("financial-inference/scheduler-allow-xds")
        );
        assert_eq!(
            calico_policy_name("KubernetesNetworkPolicy team-b/deny-from-other-ns ingress")
                .as_deref(),
            Some("team-b/deny-from-other-ns")
        );
        assert_eq!(
            calico_policy_name("cali:abc; Policy ns/default.p egress").as_deref(),
            Some("ns/default.p")
        );
        assert_eq!(
            calico_policy_name("GlobalNetworkPolicy allow-dns egress").as_deref(),
            Some("allow-dns")
        );
        assert_eq!(calico_policy_name("Profile kns.default ingress"), None);
        assert_eq!(calico_policy_name("cali:wUHhoiAYhphO9Mso"), None);
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
        assert_eq!(o.system, "kube-router");
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
        assert_eq!(o.system, "flannel");
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
}
