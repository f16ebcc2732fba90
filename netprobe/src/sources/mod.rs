//! Sources: where a session's events come from. Each implements [`crate::session::Source`];
//! a new source (say, Cilium's datapath drop notifications) is one new module here.
//!
//! - [`ring`]: the kernel programs' ring buffer (tc checkpoints, drops, resets, socket states).
//! - [`nftrace`]: the nftables trace, naming the netfilter rule behind a drop or reject: of
//!   the traced port (`trace`), or of single flows armed after a drop ([`nftrace::armed`], the
//!   agent).
//! - [`xtables`]: rule counters (iptables-legacy; nf_tables too for the agent), read when
//!   netfilter drops a packet, for drops no trace explains.
//! - [`recorded`]: a recorded NDJSON stream, replayed without a kernel.
//! - [`tcp_opens`]: connection attempts counted from each namespace's TCP MIB (healthy ones
//!   cost the agent no event).
//! - [`traces`]: `Trace` objects the agent answers in its own session (issue #24).

pub mod nftrace;
pub mod recorded;
pub mod ring;
pub mod tcp_opens;
pub mod traces;
pub mod xtables;
