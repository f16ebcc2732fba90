//! Flannel: `FLANNEL-…` chains (iptables) and `flannel…` tables (nft). Flannel itself only
//! accepts and masquerades; a drop in its chains is a leftover of an old configuration.

use crate::{attribution::Owner, attribution::rules::RuleRef, model::Cni};

pub fn owns(rule: &RuleRef) -> bool {
    rule.chain.starts_with("FLANNEL") || rule.table.starts_with("flannel")
}

pub fn owner(rule: &RuleRef) -> Option<Owner> {
    owns(rule).then(|| {
        Owner::new(
            Cni::Flannel,
            "flannel-leftover",
            format!(
                "Flannel rule in {}: a leftover if the cluster no longer runs Flannel",
                rule.chain
            ),
        )
    })
}
