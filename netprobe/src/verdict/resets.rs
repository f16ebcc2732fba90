//! Resets after the handshake that this node sent (`reset_after_established`): who sent it and
//! why. The kernel's reason (`enum sk_rst_reason`, 6.10+) is named from its BTF by the
//! enricher; an *active* reset (sent by a socket's own decision, `tcp_send_active_reset`: no
//! segment caused it) is the socket owner's doing — the peer's application closing with unread
//! data, lingering 0, a socket destroyed — and for the reasons a process causes, the kernel
//! sends it in that process's context, which names it. A reset in answer to a segment
//! (`NO_SOCKET`, a segment for a closed socket) is the kernel's.

use serde::{Deserialize, Serialize};

use super::{Verdict, ns_name};
use crate::{
    events::{Event, Process},
    model::Peer,
};

/// The reason said when the kernel gives none (before 6.10 `tcp_send_reset` has no reason).
pub const UNKNOWN_REASON: &str = "unknown";

/// Reasons whose reset the kernel sends in the context of the process that closed, disconnected
/// or destroyed the socket (`close()`, `connect(AF_UNSPEC)`, `ss -K`); the others come from a
/// timer or an incoming segment, where the current process is whoever ran.
const PROCESS_CONTEXT: &[&str] = &[
    "TCP_ABORT_ON_CLOSE",
    "TCP_ABORT_ON_LINGER",
    "TCP_DISCONNECT_WITH_DATA",
    "TCP_STATE",
];

/// Which end's socket sent a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Client,
    Server,
}

/// The socket on this node whose own decision (not a segment) sent the reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResetSender {
    pub side: Side,
    /// Its network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Its pod, when the inventory names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Peer>,
    /// The process that closed, disconnected or destroyed the socket (for the reasons a process
    /// causes; a reset sent by a timer has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
}

/// The kernel's reason for a reset it sent, [`UNKNOWN_REASON`] without one.
pub fn reason(sent: &Event) -> String {
    sent.reset
        .as_ref()
        .and_then(|r| r.reason.clone())
        .unwrap_or_else(|| UNKNOWN_REASON.into())
}

/// Sent by a socket's own decision: the event has the socket and no causing segment.
fn active(sent: &Event) -> bool {
    sent.sock.is_some() && sent.skb.is_none()
}

/// Does `reason` name a process? Without a reason (older kernels) an active reset is most
/// often a close, so its process is named.
fn in_process_context(reason: &str) -> bool {
    reason == UNKNOWN_REASON || PROCESS_CONTEXT.contains(&reason)
}

/// The socket that sent an active reset; None for a reset in answer to a segment.
pub fn sender(sent: &Event, v: &Verdict) -> Option<ResetSender> {
    if !active(sent) {
        return None;
    }
    let side = if (sent.src, sent.sport) == (v.client.addr, v.client.port) {
        Side::Client
    } else {
        Side::Server
    };
    Some(ResetSender {
        side,
        netns: ns_name(sent),
        pod: sent.source.clone().filter(Peer::is_known),
        process: in_process_context(&reason(sent))
            .then(|| sent.process.clone())
            .flatten(),
    })
}

/// `comm (pid N) in ns/pod` (or the namespace, or "a process").
fn who(s: &ResetSender) -> String {
    let process = s.process.as_ref().map_or_else(
        || "the socket's owner".to_string(),
        |p| format!("{} (pid {})", p.comm, p.pid),
    );
    let place = s
        .pod
        .as_ref()
        .map(Peer::describe)
        .or_else(|| s.netns.clone())
        .map(|p| format!(" in {p}"))
        .unwrap_or_default();
    format!("{process}{place}")
}

/// What the socket's owner did, by the kernel's reason.
fn deed(reason: &str) -> &'static str {
    match reason {
        "TCP_ABORT_ON_CLOSE" => {
            "closed the connection with data still unread; the kernel answers that with a reset"
        }
        "TCP_ABORT_ON_LINGER" => {
            "closed the connection with SO_LINGER 0 (an abortive close); the kernel sends a reset instead of a FIN"
        }
        "TCP_DISCONNECT_WITH_DATA" => {
            "disconnected the socket (connect AF_UNSPEC) with data unread; the kernel sends a reset"
        }
        "TCP_STATE" => "destroyed the socket (ss -K, SOCK_DESTROY); the kernel sends a reset",
        "TCP_KEEPALIVE_TIMEOUT" => {
            "had its keepalive probes unanswered; the kernel gave up the connection with a reset"
        }
        "TCP_ABORT_ON_MEMORY" => {
            "had closed the socket and the kernel, short of memory for closed sockets, reset it"
        }
        _ => "aborted the connection; the kernel sent a reset",
    }
}

/// The explanation and next steps of an active reset by `s` for `reason`; `app_sees` is the
/// client's errno.
pub fn sentence(
    s: &ResetSender,
    reason: &str,
    app_sees: &str,
    next_steps: &mut Vec<String>,
) -> String {
    let who = who(s);
    let why = match s.side {
        Side::Server => format!(
            "The connection was established, then the server on this node: {who} {} ({reason}). That is normal for some servers at the end of a response, a failure if the client still expected an answer. The client sees {app_sees}.",
            deed(reason)
        ),
        Side::Client => format!(
            "The connection was established, then the client itself: {who} {} ({reason}); nothing on the network reset it.",
            deed(reason)
        ),
    };
    next_steps.push(match (s.side, reason) {
        (Side::Server, "TCP_ABORT_ON_CLOSE" | "TCP_ABORT_ON_LINGER") => format!(
            "look at {who} when it closed: its logs (a request too large, an error path, a crash or a kill), and whether the client expected an answer"
        ),
        (_, "TCP_STATE") => format!("who destroyed the socket: {who} (ss -K or a SOCK_DESTROY)"),
        _ => format!("look at {who}: why it ended the connection ({reason})"),
    });
    why
}

/// The explanation and next steps of a reset the kernel sent in answer to a segment
/// (`NO_SOCKET`: the socket is gone; others: the segment did not fit the socket).
pub fn kernel_sentence(sent: &Event, reason: &str, next_steps: &mut Vec<String>) -> String {
    let at = ns_name(sent)
        .map(|n| format!(" in {n}"))
        .unwrap_or_default();
    if reason == "NO_SOCKET" {
        next_steps.push("did the server restart, or close the connection (its socket is gone) while the client still sent? the client must reconnect".into());
        return format!(
            "The connection was established, then the kernel{at} answered one of its segments with a reset (NO_SOCKET): no socket exists for the connection there any more — the server closed it or restarted."
        );
    }
    next_steps.push("did the server close its socket (or restart) while the client still sent? a conntrack INVALID drop or asymmetric routing shows as a drop before the reset".into());
    format!(
        "The connection was established, then the kernel{at} answered one of its segments with a reset ({reason}): its socket was closed or the segment did not fit it."
    )
}
