//! netprobe: where and why a pod's TCP connection died.
//!
//! The pipeline is visible in the module names:
//! [`probes`] (load and attach the kernel programs) → [`events`] (raw kernel records → the public,
//! versioned event schema) → [`collectors`] (ring buffer, counters, nftables trace) → [`enrich`]
//! (names for reasons, code locations, namespaces, interfaces, listeners, netfilter rules and
//! their owners) → [`verdict`] (pure: one verdict per connection attempt) → [`outputs`].
//! [`trace`] wires them together for the `trace` command; front-ends stay thin.

pub mod agent;
pub mod cluster;
pub mod collectors;
pub mod enrich;
pub mod error;
pub mod events;
pub mod netlink;
pub mod netns;
pub mod outputs;
pub mod probes;
pub mod trace;
pub mod verdict;

pub use error::Error;
