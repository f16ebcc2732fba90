//! The library's error type: structured variants, sources kept (including the verifier log of a
//! program that failed to load, which aya's `ProgramError::LoadError` carries in its message).

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netprobe must run as root (it loads eBPF programs and enters network namespaces)")]
    NotRoot,
    #[error(
        "cannot read kernel BTF from {path}: {reason}; netprobe needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    Btf { path: PathBuf, reason: String },
    #[error(
        "kernel BTF has no member `{member}` in `struct {strukt}`; this kernel is not supported"
    )]
    BtfMember {
        strukt: &'static str,
        member: &'static str,
    },
    #[error("kernel BTF has no `{what}`")]
    BtfMissing { what: String },
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program `{program}` is missing from the object")]
    ProgramMissing { program: &'static str },
    #[error("eBPF map `{map}` is missing or has an unexpected type")]
    MapMissing { map: &'static str },
    #[error("failed to load eBPF program `{program}`")]
    ProgramLoad {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to attach `{program}` to {target}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to use map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("network namespace `{name}` not found (looked for {path})")]
    UnknownNetns { name: String, path: PathBuf },
    #[error("network namespace `{name}` ({path}) is gone or unusable")]
    Netns {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "network namespace `{name}` ({path}) was deleted during the trace (pod deleted or restarted?); what was seen until then is above"
    )]
    NetnsVanished { name: String, path: PathBuf },
    #[error(
        "interrupted (SIGINT/SIGTERM) before the trace was in place; what was installed is removed"
    )]
    Interrupted,
    #[error("netlink {what} failed")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("Kubernetes API: {what}: {reason}")]
    Kube { what: String, reason: String },
    #[error("pod `{name}`{} not found on this node's API inventory", namespace.as_ref().map(|n| format!(" in namespace `{n}`")).unwrap_or_default())]
    UnknownPod {
        namespace: Option<String>,
        name: String,
    },
    #[error("pod name `{name}` is ambiguous: it exists in namespaces {namespaces}; use -n")]
    AmbiguousPod { name: String, namespaces: String },
    #[error(
        "pod {namespace}/{name} has no network namespace on this node (is it scheduled here and running?)"
    )]
    PodNotHere { namespace: String, name: String },
    #[error(
        "no running netprobe agent on node {node} (label app.kubernetes.io/name=netprobe in namespace {namespace}); is the DaemonSet installed there? (--agent-namespace)"
    )]
    NoAgent { node: String, namespace: String },
    #[error("cluster-mode trace: {reason}")]
    Remote { reason: String },
    #[error("invalid address `{0}`")]
    BadAddress(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
