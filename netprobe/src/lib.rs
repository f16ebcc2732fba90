//! netprobe: where and why a pod's TCP connection (or DNS lookup) died.
//!
//! # The pipeline
//!
//! `netprobe trace` and `netprobe agent` are two configurations of one [`session`] loop:
//!
//! ```text
//!            ┌──────────────┐   ┌────────────────┐   ┌──────────────┐   ┌─────────────────┐
//!  kernel ──►│   sources    │──►│ route + stages │──►│    judge     │──►│      sinks      │
//!            │ ring buffer  │   │ names (pods,   │   │ verdict      │   │ text, NDJSON,   │
//!            │ nftables     │   │ Services),     │   │ engine: one  │   │ Prometheus,     │
//!            │ trace,       │   │ conntrack,     │   │ verdict per  │   │ Kubernetes      │
//!            │ recording    │   │ xtables ctrs   │   │ attempt      │   │ Events          │
//!            └──────────────┘   └────────────────┘   └──────────────┘   └─────────────────┘
//!   probes/ (load, attach)        enrich/              verdict/ (pure)    sinks/
//! ```
//!
//! - [`probes`] loads and attaches the kernel programs (`netprobe-ebpf`), reads the running
//!   kernel's BTF and cleans up what a killed netprobe left.
//! - [`sources`] turn what the kernel and netfilter report into [`events::Event`]s (the public,
//!   versioned schema; [`events::raw`] keeps the kernel-facing records apart).
//! - [`model`] holds the typed vocabulary every stage shares (outcomes, endpoints, TCP states,
//!   netfilter actions, rule owners, pods as peers); it depends on nothing else in the crate,
//!   but for [`model::trace`], the `Trace` custom resource, whose status holds verdicts.
//! - [`enrich`] names things: reasons, code locations, namespaces, interfaces, pods and Services
//!   ([`enrich::names`]), conntrack, routes, listeners; [`enrich::stages`] runs them inside the
//!   session.
//! - [`attribution`] says which netfilter rule decided ([`attribution::rules`]: nftables trace
//!   paths, rulesets, iptables-legacy counters) and what it means in the words of the CNI that
//!   wrote it ([`attribution::cni`]: Calico, kube-proxy, kube-router, Flannel).
//! - [`verdict`] is pure: it groups events into connection attempts (or DNS lookups) and judges
//!   each with the evidence it has; [`session::Judge`] feeds it and names its endpoints.
//! - [`sinks`] print or export: [`sinks::text`], [`sinks::ndjson`] (the only NDJSON writer),
//!   [`sinks::prometheus`], [`sinks::kube_events`], [`sinks::storm`] (the agent's log).
//! - [`trace`] and [`agent`] are the front-ends: each resolves its scope, attaches the probes and
//!   configures a [`session::Session`]; [`cluster`] is cluster mode (protocol, agent-side server,
//!   laptop-side client, cross-node plan). `main.rs` only parses flags.
//!
//! # Where to add things
//!
//! - **A new attribution source** (say, Cilium's datapath drop notifications): one module under
//!   `sources/` implementing [`session::Source`] (it yields enriched events, e.g. a `netfilter`
//!   or `drop` event naming the program and the policy), added to the `sources` of the
//!   configurations that should run it (`trace.rs`, `agent.rs`). Enrichment that reacts to an
//!   event (like the iptables-legacy counters in [`sources::xtables`]) implements
//!   [`session::Stage`] instead.
//! - **A new sink** (say, OpenTelemetry logs): one module under `sinks/` implementing
//!   [`sinks::Sink`] (events, verdicts, ticks, the summary; every method optional), added with
//!   `Sinks::with` where it should run. No other sink changes.
//! - **A new outcome class**: a variant of [`model::Outcome`] in `model/outcome.rs` (its
//!   headline and whether it is a failure live beside it) and the rule that decides it in
//!   `decide` of `verdict/mod.rs` (`verdict/udp.rs` for datagrams), from the evidence
//!   `Evidence::gather` collects; the recorded fixtures under `verdict/fixtures/`, their golden
//!   verdicts and `verdict/tests.rs` show how to test it from a lab recording, and the JSON
//!   Schema (`netprobe schema`) follows from the types.

pub mod agent;
pub mod attribution;
pub mod cluster;
pub mod enrich;
pub mod error;
pub mod events;
pub mod model;
pub mod netlink;
pub mod netns;
pub mod probes;
pub mod session;
pub mod sinks;
pub mod sources;
pub mod trace;
pub mod verdict;

pub use error::Error;

/// JSON Schemas of everything netprobe writes as JSON (`netprobe schema`), keyed by the
/// `schema` value each record carries: the NDJSON records and the failures answer; and the
/// `Trace` object's, as the API server admits it (key [`model::trace::SCHEMA_KEY`]).
pub fn json_schemas() -> serde_json::Value {
    let mut all = sinks::ndjson::json_schemas();
    all[cluster::failures::FAILURES_SCHEMA] =
        serde_json::to_value(schemars::schema_for!(cluster::failures::FailuresAnswer))
            .expect("a schema is JSON");
    all[model::trace::SCHEMA_KEY] = model::trace::object_schema();
    all
}
