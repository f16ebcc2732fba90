//! Sources: where a session's events come from. Each implements [`crate::session::Source`];
//! a new source (say, Cilium's datapath drop notifications) is one new module here.
//!
//! - [`ring`]: the kernel programs' ring buffer (tc checkpoints, drops, resets, socket states).
//! - [`nftrace`]: the nftables trace, naming the netfilter rule behind a drop or reject.
//! - [`xtables`]: iptables-legacy rule counters, read when x_tables drops a traced packet.
//! - [`recorded`]: a recorded NDJSON stream, replayed without a kernel.
//! - [`tcp_opens`]: connection attempts counted from each namespace's TCP MIB (healthy ones
//!   cost the agent no event).

pub mod nftrace;
pub mod recorded;
pub mod ring;
pub mod tcp_opens;
pub mod xtables;
