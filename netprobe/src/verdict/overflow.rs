//! A timeout that is a full accept queue: the kernel of the server's namespace dropped the SYNs
//! because the listener's accept queue was full (the server does not accept() fast enough, or
//! its backlog is too small). Found when the verdict is made (see `enrich::backlog`).

use super::{Outcome, Verdict};
use crate::enrich::backlog::ListenQueue;

/// Makes a timed-out verdict the listen overflow it is: outcome, headline, the listener as the
/// only listener, and the server's namespace. [`render`] writes the texts once names are known.
pub fn attach(v: &mut Verdict, q: ListenQueue) {
    v.outcome = Outcome::DroppedByKernel;
    v.server.netns.get_or_insert_with(|| q.netns.clone());
    v.listeners = vec![q.listener.clone()];
    v.route = None;
    v.listen_queue = Some(q);
    render(v);
}

/// Headline, explanation and next steps of a verdict with [`Verdict::listen_queue`].
pub fn render(v: &mut Verdict) {
    let Some(q) = &v.listen_queue else {
        return;
    };
    // The listener as named by the judge (its container), else as read.
    let l = v.listeners.first().unwrap_or(&q.listener);
    let pod = v.server.peer.as_ref().and_then(|p| {
        Some(format!(
            "pod {}/{}",
            p.namespace.as_deref()?,
            p.pod.as_deref()?
        ))
    });
    let owner = [
        pod,
        l.container.as_ref().map(|c| format!("container {c}")),
        l.comm.as_ref().map(|c| match l.pid {
            Some(pid) => format!("process {c}, pid {pid}"),
            None => format!("process {c}"),
        }),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    let owner = if owner.is_empty() {
        format!("in {}", q.netns)
    } else {
        format!("{owner}, in {}", q.netns)
    };
    v.headline = format!(
        "dropped: the server's accept queue is full on {} (listen overflow)",
        l.endpoint()
    );
    let cookies = match q.syncookies {
        Some(0) => " SYN cookies are off there (net.ipv4.tcp_syncookies=0).".to_string(),
        Some(n) => format!(
            " SYN cookies are on there (net.ipv4.tcp_syncookies={n}, {} sent), but they do not help once the accept queue itself is full.",
            q.syncookies_sent
        ),
        None => String::new(),
    };
    v.explanation = format!(
        "The listener {} ({owner}) has {} connections waiting to be accept()ed and a backlog of {}: its accept queue is full, so the kernel there drops new SYNs without answering (ListenOverflows {}, ListenDrops {} in that namespace) and the client times out. The server does not accept() fast enough, or its backlog is too small.{cookies}",
        l.endpoint(),
        q.accept_queue,
        q.backlog,
        q.listen_overflows,
        q.listen_drops,
    );
    let enter = l.pid.map_or_else(
        || format!("ip netns exec {}", q.netns),
        |p| format!("nsenter -t {p} -n"),
    );
    v.next_steps = vec![
        format!(
            "watch the queue: `{enter} ss -ltn 'sport = :{}'` (Recv-Q: waiting for accept(), Send-Q: the backlog)",
            l.port
        ),
        format!("watch the drops: `{enter} nstat -az TcpExtListenOverflows TcpExtListenDrops`"),
        "check why the server does not accept(): a blocked or overloaded accept loop, too few workers".into(),
        format!(
            "or raise the backlog: the server's listen() argument, capped by `{enter} sysctl net.core.somaxconn`"
        ),
    ];
}
