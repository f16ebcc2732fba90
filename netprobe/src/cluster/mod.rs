//! Cluster mode: `netprobe trace --cluster --pod X` (or `kubectl netprobe trace --pod X`) run
//! from a laptop creates a `Trace` object ([`trace_object`], [`crate::model::trace`]) that the
//! agent of the pod's node answers in its status: only the API server is reached, and RBAC on
//! `traces.netprobe.io` decides who may trace where.
//!
//! The way before it, still behind `--via-agent` until the agents answer Trace objects, finds
//! the pod's node through the API, opens a port-forward to that node's
//! agent (the agent is hostNetwork, so the port-forward lands on the node's loopback where the
//! agent listens) and asks it to run the trace; verdicts stream back as they happen.
//!
//! Who may trace is decided by RBAC, and checked by the agent: the client sends a bearer token
//! ([`token`]: the kubeconfig's, else a TokenRequest for a ServiceAccount) on every request,
//! and the agent asks the API server who it is and whether they may trace the pod's namespace
//! or read failures ([`auth`]: TokenReview, SubjectAccessReview). The port-forward
//! (`pods/portforward` of the agent pods) is only the way in; nothing listens on the node
//! network.
//!
//! - [`protocol`]: the request (`GET /v1/trace?…`, upgraded to a two-way stream) and the typed
//!   frames the agent sends back (`netprobe.cluster.{ready,verdict,event,summary,log,error,exit}/v1`).
//! - [`server`]: the agent's HTTP endpoints; a trace runs as a child `netprobe trace -o json`
//!   (its own probes and temporary nftables table), whose records become frames and whose
//!   `--ready-file` (a pipe) becomes the ready frame.
//! - [`client`]: the laptop's side: pod → node → agent, port-forward, frames → the printer.
//! - [`event_failures`]: `kubectl netprobe failures` — the agents' Kubernetes Events read from
//!   the API server and grouped ([`failures`]: the query, the answer, its text); [`memory`]:
//!   the agent's own memory of recent failures, served on `/v1/failures`.
//! - [`kubeconfig`]: kubectl's `--kubeconfig`, `--context`, `--as`, `--request-timeout`.
//! - `crossnode`: when the destination's pods run on other nodes, their agents trace too and
//!   each attempt's verdicts are joined.

pub mod auth;
pub mod client;
mod crossnode;
pub mod event_failures;
pub mod failures;
pub mod kubeconfig;
pub mod memory;
pub mod protocol;
pub mod server;
pub mod token;
pub mod trace_object;
