//! Whose an address is: the pod, container, node or Service behind it.

use serde::{Deserialize, Serialize};

/// Who an address belongs to. Absent fields are unknown (printed as such), never guessed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Peer {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub node: Option<String>,
    /// `namespace/name:port` of the Service whose ClusterIP this is.
    pub service: Option<String>,
    /// `Kind/name` of the workload owning the pod (Deployment, StatefulSet, DaemonSet, Job,
    /// CronJob; a bare ReplicaSet or the pod itself when there is no higher owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl Peer {
    pub fn is_known(&self) -> bool {
        self.pod.is_some() || self.service.is_some()
    }

    pub fn describe(&self) -> String {
        match (&self.namespace, &self.pod, &self.service) {
            (_, _, Some(s)) => format!("Service {s}"),
            (Some(ns), Some(p), _) => {
                format!(
                    "{ns}/{p}{}",
                    self.container
                        .as_ref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default()
                )
            }
            _ => "unknown".into(),
        }
    }
}
