//! The `netprobe` command line. Thin: parsing, then the library; `anyhow` only here.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use netprobe::{sinks::Format, trace};

/// Whether this binary has the node side (cargo feature `ebpf`, on by default): the kernel
/// programs and the node commands. Without it, it is the client-only `kubectl-netprobe`.
const NODE_BUILD: bool = cfg!(feature = "ebpf");

/// Exit code when a failed connection attempt was diagnosed.
const EXIT_DIAGNOSED: u8 = 1;
/// Exit code when the trace ended without any connection attempt.
const EXIT_NO_ATTEMPT: u8 = 3;
/// Exit code for usage and environment errors (unknown netns, not root, no BTF, probes failed,
/// a traced namespace deleted mid-trace).
const EXIT_USAGE: u8 = 2;
/// Exit code when SIGINT/SIGTERM stopped a trace before it was in place (128 + SIGINT, as a
/// shell reports Ctrl-C); what it had installed is removed.
const EXIT_INTERRUPTED: u8 = 130;
/// The longest `--duration`: a trace runs until Ctrl-C without one; longer ones are typos that
/// would otherwise overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Parser)]
#[command(
    name = "netprobe",
    version,
    about = "Where and why a pod's TCP connection or DNS lookup died: eBPF tracing of SYNs, datagrams, resets and drops on a Kubernetes node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per run; boxing would only obscure the clap derive"
)]
enum Command {
    /// Always-on mode (DaemonSet): drops, resets, application errors, SYN retransmits,
    /// RST/ICMP-unreachable packets and failed DNS lookups (dropped, rejected, unanswered,
    /// SERVFAIL) of the node and every pod behind its veths as NDJSON on stdout; Prometheus /metrics, /healthz,
    /// /readyz (200 once the probes are attached; the body names what is degraded: a probe
    /// the kernel refused, an inventory not synced while the API server is down), /v1/trace
    /// (cluster-mode traces) and /v1/failures (what this agent saw fail in the last 60
    /// minutes) on --metrics-addr; those two only for a bearer token the
    /// Kubernetes API accepts (TokenReview) and allows (SubjectAccessReview on
    /// traces/failures.netprobe.io), each request logged with who asked. SIGTERM stops running
    /// traces (their tables removed) before exiting. Installs no firewall rule.
    #[cfg(feature = "ebpf")]
    Agent(AgentArgs),
    /// Print the JSON Schemas of the objects `trace -o json` prints (events, verdicts, summary)
    /// and of the answer `failures -o json` prints, keyed by their `schema` value.
    Schema,
    /// Report which kernel hooks and features this machine offers; exit 0 if tracing can work.
    #[cfg(feature = "ebpf")]
    Check(CheckArgs),
    /// Follow connection attempts to a port and print one verdict per attempt: connected,
    /// refused (no listener / by a rule), dropped (by a rule / by the kernel), reset, timed out —
    /// with the timeline, the rule and its owner, and what to check next. A connection that
    /// connected is followed until it ends: a second verdict says closed, reset (by the peer —
    /// naming the process that closed its socket and the kernel's reason —, a rule, the kernel),
    /// stalled, MTU black hole or aborted; a reset exits 1 whoever sent it. Exit 0 all connected (and closed
    /// cleanly), 1 a failure was diagnosed, 2 usage/environment error (also: a traced namespace, e.g. the
    /// --pod's, deleted mid-trace), 3 no attempt seen, 130 interrupted (SIGINT/SIGTERM) before
    /// the trace was in place (what it had installed is removed).
    /// With --events, print every SYN, SYN-ACK, RST, ICMP unreachable, drop, reset, retransmit,
    /// state change, socket error and netfilter rule hit instead.
    ///
    /// Run as root on the node (or inside a lab's node namespace: `ip netns exec NODE netprobe
    /// trace …`). Without --netns it watches this namespace and the pod namespaces its veths lead
    /// to, and attaches tc programs to this namespace's interfaces.
    ///
    /// To name the netfilter rule behind a drop, a trace installs a TEMPORARY nftables table
    /// (`inet netprobe_<pid>`, earliest priority of prerouting and output) that sets
    /// `meta nftrace` on the traced flow only (its SYN, FIN, RST and the ICMP errors quoting it;
    /// a client whose data a rule dropped is traced a few seconds through `inet
    /// netprobe_<pid>_armed`); it is removed when the trace ends (also on Ctrl-C
    /// and errors), and leftovers of a killed netprobe are removed at the next start. Disable
    /// with --no-rule-trace. The tc programs never alter packets and go away when netprobe exits.
    ///
    /// UDP and DNS (--proto udp, --dns): one verdict per exchange (per DNS query): answered
    /// (with the rcode; NXDOMAIN is an answer, SERVFAIL and REFUSED are failed lookups: exit 1),
    /// dropped (by a rule / by the kernel), refused (no socket: ICMP port unreachable), or
    /// unanswered (no reply after 5 s and no drop on this node); DNS verdicts name the query
    /// (name and type).
    Trace(TraceArgs),
    /// What is failing on the cluster right now and in the last minutes, as the nodes' agents
    /// recorded it in Kubernetes Events (also `kubectl netprobe failures`, from a laptop).
    ///
    /// Every agent writes a Warning Event for each failed connection attempt and DNS lookup it
    /// judges (refused, dropped by a rule or the kernel, unreachable, reset, timed out) on the
    /// pods of its node, one Event per (pod, reason, peer workload, port) with series.count,
    /// the details in netprobe.io/ annotations. This lists those Events from the API server
    /// (field selector reportingController=netprobe.io/agent) in the namespace (-n, else the
    /// kubeconfig's) or in all namespaces (-A), and prints them grouped by client workload →
    /// Service:port (else the server's workload), outcome and rule/policy, with counts (now =
    /// Events last observed this minute and the previous; and over --since) and one Event's
    /// note per group. A failure's Events on the client and on the server pod count once.
    /// Who sees what is the API server's RBAC: `list` on events (events.k8s.io) in the
    /// namespace, or cluster-wide for -A. Exit 0 when the API answered, 2 otherwise.
    ///
    /// Examples: `kubectl netprobe failures -A`; `kubectl netprobe failures -n
    /// financial-inference --since 30m`; `kubectl netprobe failures -A --workload
    /// Deployment/client -o json`.
    Failures(FailuresArgs),
    /// Print a shell completion script. Examples: `source <(netprobe completions bash)`;
    /// `netprobe completions zsh > "${fpath[1]}/_netprobe"`;
    /// `netprobe completions fish > ~/.config/fish/completions/netprobe.fish`.
    Completions(CompletionsArgs),
    /// Print the man page (roff) of netprobe or of one of its commands.
    /// Example: `netprobe man | gzip > /usr/local/share/man/man1/netprobe.1.gz`
    #[command(hide = true)]
    Man(ManArgs),
    /// The node commands on the client-only build: refused, saying why.
    #[cfg(not(feature = "ebpf"))]
    #[command(hide = true, disable_help_flag = true)]
    Agent(NodeOnly),
    #[cfg(not(feature = "ebpf"))]
    #[command(hide = true, disable_help_flag = true)]
    Check(NodeOnly),
}

/// Whatever follows a node command on the client-only build.
#[cfg(not(feature = "ebpf"))]
#[derive(clap::Args)]
struct NodeOnly {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
    /// The command name to complete (e.g. kubectl-netprobe).
    #[arg(long, default_value = "netprobe")]
    name: String,
}

#[derive(clap::Args)]
struct ManArgs {
    /// The command whose page to print (default: netprobe's). Example: trace
    command: Option<String>,
}

/// kubectl's connection flags (cluster mode).
#[derive(clap::Args)]
#[command(next_help_heading = "Kubernetes API (cluster mode)")]
struct KubeArgs {
    /// The kubeconfig file to use (default: KUBECONFIG, else ~/.kube/config, else the
    /// in-cluster service account).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context; its namespace is the
    /// default of -n).
    #[arg(long)]
    context: Option<String>,
    /// Impersonate this user on every Kubernetes API request (RBAC: `impersonate`). The agents
    /// (`failures`, `trace --via-agent`) check a bearer token and cannot impersonate: with --as, the kubeconfig's own token is
    /// never sent; the agents get a token requested (as this user) for --as-service-account,
    /// or, for --as system:serviceaccount:NS:NAME, for that ServiceAccount. --as a user without
    /// --as-service-account is refused.
    #[arg(long = "as", value_name = "USER")]
    impersonate: Option<String>,
    /// The longest wait for one Kubernetes API request (pod and agent lookups, token request,
    /// opening a port-forward), e.g. 30s, 500ms, 2m; 0: kube's defaults. The trace's stream
    /// itself is bounded by --duration.
    #[arg(long, value_name = "DURATION",
          value_parser = netprobe::cluster::kubeconfig::parse_request_timeout)]
    request_timeout: Option<Duration>,
}

impl KubeArgs {
    /// Whether any is set: they only mean something in cluster mode.
    fn given(&self) -> bool {
        self.kubeconfig.is_some()
            || self.context.is_some()
            || self.impersonate.is_some()
            || self.request_timeout.is_some()
    }

    fn options(self) -> netprobe::cluster::kubeconfig::KubeOptions {
        netprobe::cluster::kubeconfig::KubeOptions {
            kubeconfig: self.kubeconfig,
            context: self.context,
            impersonate: self.impersonate,
            request_timeout: self.request_timeout.filter(|t| !t.is_zero()),
        }
    }
}

#[cfg(feature = "ebpf")]
#[derive(clap::Args)]
struct AgentArgs {
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz, /v1/trace, /v1/failures).
    /// Loopback by default: nothing unauthenticated on the node network; Prometheus scrapes
    /// through the authenticating proxy of deploy/ (kube-rbac-proxy), cluster-mode traces and
    /// `failures` arrive through pods/portforward. 19965: not a port of Cilium (9962-9966), the
    /// Prometheus exporter range (9100-9999) or Kubernetes (10248-10260); see deploy/README.md.
    /// Example: --metrics-addr 127.0.0.1:19965
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:19965")]
    metrics_addr: std::net::SocketAddr,
    /// This node's name: the inventory then lists only this node's pods, and every JSON record
    /// says it observed it (`node`; default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Events per second written per (kind, reason, pod); the rest become `suppressed`
    /// records with their count (and are all counted in /metrics).
    #[arg(long, env = "RATE_LIMIT", default_value_t = 20)]
    rate_limit: u32,
    /// Create this file once all probes are attached.
    #[arg(long, hide = true)]
    ready_file: Option<PathBuf>,
    /// Size of the kernel → agent ring buffer in KiB (a power of two). Events that find it
    /// full are counted as lost (netprobe_lost_events_total), never dropped silently.
    #[arg(long, env = "NETPROBE_RING_KIB", default_value_t = 4096, value_parser = parse_ring_kib)]
    ring_buffer_kib: u32,
    /// Turn on the kernel's run-time statistics of BPF programs while the agent runs, so that
    /// /metrics shows what netprobe's programs cost (netprobe_program_runs_total,
    /// netprobe_program_run_seconds_total). System-wide: every program's runs then cost two
    /// clock reads more; off by default.
    #[arg(long, env = "NETPROBE_PROGRAM_STATS")]
    program_stats: bool,
    /// Also write the raw kernel events (drops, resets, retransmits, ICMP errors) to stdout,
    /// those that belong to no connection attempt included (IPv6 router solicitations, packets
    /// of connections that ended). By default stdout has one verdict per failed connection
    /// attempt (and per connection that died after its handshake), one `dns_failure` per failed
    /// lookup and `suppressed` records; raw drops are only
    /// counted by reason in /metrics.
    #[arg(long, env = "NETPROBE_RAW_EVENTS")]
    raw_events: bool,
    /// Also label netprobe_failed_connections_total by pod (src_pod, dst_pod). Off by default:
    /// workload labels (Deployment/…, StatefulSet/…) survive restarts, pod labels make a new
    /// series for every new pod.
    #[arg(long, env = "NETPROBE_METRICS_POD_LABELS")]
    metrics_pod_labels: bool,
    /// At most this many netprobe_failed_connections_total series; a new one evicts the least
    /// recently counted (netprobe_metric_series_evicted_total{reason="limit"}).
    #[arg(long, env = "NETPROBE_METRICS_MAX_SERIES",
          default_value_t = netprobe::sinks::prometheus::failed::DEFAULT_MAX_SERIES as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    metrics_max_series: u32,
    /// Seconds the series of a deleted pod (or of a workload without pods left) stay in
    /// /metrics, so that every scraper sees their last count; then they are removed
    /// (netprobe_metric_series_evicted_total{reason="expired"}).
    #[arg(long, env = "NETPROBE_METRICS_SERIES_GRACE", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    metrics_series_grace: u64,
    /// Network namespaces watched at once, the node's included (the size of the kernel's
    /// namespace filter map). A pod beyond it is not watched until others are deleted: counted
    /// in netprobe_unwatched_namespaces and netprobe_netns_filter_refused_total, logged once;
    /// the agent keeps running.
    #[arg(long, env = "NETPROBE_MAX_NAMESPACES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(2..=1_048_576))]
    max_namespaces: u32,
    /// Kubernetes Event writes (creations and updates) per second, for the whole agent: a
    /// token bucket refilled at this rate. A failure whose Event must wait is counted in that
    /// Event's series.count, written when the budget allows, and counted in
    /// netprobe_kube_events_suppressed_total{cause="rate"}.
    #[arg(long, env = "NETPROBE_EVENTS_RATE", default_value_t = netprobe::sinks::kube_events::DEFAULT_RATE,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    events_rate: u32,
    /// Kubernetes Event writes the agent may send at once after a quiet while (the token
    /// bucket's size).
    #[arg(long, env = "NETPROBE_EVENTS_BURST", default_value_t = netprobe::sinks::kube_events::DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    events_burst: u32,
    /// Kubernetes Event requests open at once; a write beyond waits
    /// (netprobe_kube_events_suppressed_total{cause="in_flight"}).
    #[arg(long, env = "NETPROBE_EVENTS_IN_FLIGHT", default_value_t = netprobe::sinks::kube_events::DEFAULT_IN_FLIGHT as u32,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    events_in_flight: u32,
    /// Trace objects (traces.netprobe.io) of this node's pods running at once; the others stay
    /// Pending, their message saying why, and start as running ones end.
    #[arg(long, env = "NETPROBE_MAX_TRACES", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    max_traces: u32,
}

#[cfg(feature = "ebpf")]
#[derive(clap::Args)]
struct CheckArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(clap::Args)]
struct TraceArgs {
    /// Port to follow (source or destination), 1-65535; 53 with --dns. Example: --port 9500
    #[arg(short, long, required_unless_present = "dns", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Transport protocol to follow.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
    /// Follow DNS lookups: --proto udp --port 53, queries and replies decoded (name, type,
    /// rcode). Example: --pod client-0 --dns
    #[arg(long, conflicts_with = "proto")]
    dns: bool,
    /// Only packets from or to this address. Example: --addr 10.43.51.131
    #[arg(long)]
    addr: Option<IpAddr>,
    /// Trace inside this network namespace (name in /run/netns, or a path such as
    /// /proc/PID/ns/net); tc programs go on all its interfaces. Repeatable.
    /// Example: --netns cni-1234abcd
    #[arg(long = "netns", value_name = "NAME|PATH", hide = !NODE_BUILD)]
    netns: Vec<String>,
    /// Stop after this long (e.g. 30s, 500ms, 2m; at most 365 days); default: until Ctrl-C.
    /// Cluster mode: the Trace's duration, default 30s, at most 10m.
    #[arg(short, long, visible_alias = "timeout", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// text: a block per verdict (a line per event with --events); json: one JSON object
    /// per line (schemas netprobe.verdict/v1 and netprobe.event/v1),
    /// the last one a summary with counts of lost events.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Print every event (packets, drops, resets, state changes, rule hits) as it happens,
    /// instead of one verdict per connection attempt.
    #[arg(long)]
    events: bool,
    /// Stop after this many verdicts. Example: --count 1
    #[arg(long)]
    count: Option<u64>,
    /// Trace connections to or from this pod: found through the Kubernetes API (KUBECONFIG or
    /// in-cluster config); its network namespace joins the trace. Example: --pod mlserver-0
    #[arg(long, conflicts_with = "netns")]
    pod: Option<String>,
    /// Namespace of --pod. Example: -n financial-ml
    #[arg(short = 'n', long, requires = "pod")]
    namespace: Option<String>,
    /// Only attempts made by this client pod (NAME or NAMESPACE/NAME); needs the API.
    /// Example: --from-pod financial-inference/client-0
    #[arg(long, value_name = "POD")]
    from_pod: Option<String>,
    /// This node's name: the inventory then lists only this node's pods, and every JSON record
    /// says it observed it (`node`; default: the host name).
    #[arg(long, env = "NODE_NAME", hide = !NODE_BUILD)]
    node_name: Option<String>,
    /// Also write every event to FILE as NDJSON (for offline analysis or a bug report).
    #[arg(long, value_name = "FILE", hide = !NODE_BUILD)]
    record: Option<PathBuf>,
    /// Do not install the temporary nftables trace table (no rule attribution).
    #[arg(long)]
    no_rule_trace: bool,
    /// Create this file once all probes are attached (for scripts and tests).
    #[arg(long, hide = true)]
    ready_file: Option<PathBuf>,
    /// Size of the kernel → netprobe ring buffer in KiB (a power of two). Events that find
    /// it full are counted and reported as lost in the summary, never dropped silently.
    #[arg(long, env = "NETPROBE_RING_KIB", default_value_t = 4096, value_parser = parse_ring_kib,
          hide = !NODE_BUILD)]
    ring_buffer_kib: u32,
    /// Cluster mode (from a laptop): create a Trace object (traces.netprobe.io, generateName
    /// <pod>-) for --pod in its namespace; the netprobe agent of the pod's node runs the trace
    /// and writes the verdicts into the object's status, printed here as they come. The object
    /// is deleted when the trace ends or on Ctrl-C (--keep keeps it). Only the Kubernetes API
    /// is reached, with the kubeconfig's own authentication (certificates, OIDC, exec plugins);
    /// RBAC: create, get, list, watch, delete on traces.netprobe.io in the pod's namespace.
    /// --duration defaults to 30s there (at most 10m). Default when run as `kubectl netprobe`
    /// (the binary installed as kubectl-netprobe) and in the client-only build.
    #[arg(long, requires = "pod", conflicts_with_all = ["netns", "record", "ready_file"])]
    cluster: bool,
    /// Cluster mode: leave the Trace object when done (`kubectl get trace -n NS` shows it; it
    /// is removed after its ttlSecondsAfterFinished, 1h).
    #[arg(long)]
    keep: bool,
    /// Cluster mode the old way: through a port-forward to the node's agent, with a bearer
    /// token (--agent-namespace, --agent-port, --as-service-account; --addr, --from-pod). Goes
    /// once the agents answer Trace objects.
    #[arg(long)]
    via_agent: bool,
    /// --via-agent: namespace of the netprobe DaemonSet.
    #[arg(
        long,
        env = "NETPROBE_NAMESPACE",
        default_value = "netprobe",
        hide = true
    )]
    agent_namespace: String,
    /// --via-agent: the agent's loopback port (the port of its --metrics-addr).
    #[arg(long, default_value_t = 19965)]
    agent_port: u16,
    /// --via-agent: the agents check who you are with a bearer token (and RBAC: `create` on
    /// traces.netprobe.io of the pod's namespace). The kubeconfig's token is sent when it has
    /// one; otherwise (client certificates, e.g. k3s's admin kubeconfig) a 10-minute token is
    /// requested for this ServiceAccount (RBAC: `create` on its serviceaccounts/token). If
    /// neither works, use a kubeconfig with a token or ask for the Role
    /// netprobe-token-requester of deploy/. [default: netprobe/netprobe-tracer when the
    /// kubeconfig has no token]
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = netprobe::cluster::token::parse_service_account)]
    as_service_account: Option<(String, String)>,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(clap::Args)]
struct FailuresArgs {
    /// Read the Events of this namespace (failures with a pod of it on one side).
    /// [default: the kubeconfig context's namespace]
    /// Example: -n financial-inference
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Read the Events of every namespace (needs `list events` cluster-wide).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only failures whose client or destination is this workload: `Kind/name` or a bare name
    /// (a pod without owner is `Pod/name`, a Service `Service/name`).
    /// Example: --workload Deployment/client
    #[arg(long)]
    workload: Option<String>,
    /// Only Events last observed this long ago or later (whole s, m or h; at most 24h; the API
    /// server keeps Events 1h by default).
    /// Example: --since 30m
    #[arg(long, default_value = "10m", value_parser = netprobe::cluster::failures::parse_since)]
    since: Duration,
    /// text: grouped by client workload; json: the answer (schema netprobe.failures/v1).
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

/// Installed as `kubectl-netprobe`, `kubectl netprobe trace …` works in cluster mode.
fn invoked_as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().starts_with("kubectl-netprobe"))
        })
        .unwrap_or(false)
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("invalid size `{s}` (KiB, e.g. 4096)"))?;
    if n < 4 || !n.is_power_of_two() || n > 1 << 20 {
        return Err(format!(
            "ring buffer size {n} KiB: must be a power of two between 4 and 1048576"
        ));
    }
    Ok(n)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}` (examples: 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in `{s}` (use ms, s, m or h)"
            ));
        }
    };
    // A negative, NaN or astronomically large duration is a usage error, not a panic.
    let out_of_range = || format!("duration `{s}` is out of range (at most 365 days)");
    let d = Duration::try_from_secs_f64(secs).map_err(|_| out_of_range())?;
    if d > MAX_DURATION {
        return Err(out_of_range());
    }
    Ok(d)
}

/// The single-threaded runtime every command runs on; `None` (after saying why) if it can't start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("netprobe: cannot start runtime: {e}"))
        .ok()
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Cli::parse().command {
        #[cfg(feature = "ebpf")]
        Command::Agent(a) => agent(a),
        Command::Schema => {
            let mut text =
                serde_json::to_string_pretty(&netprobe::json_schemas()).expect("serializable");
            text.push('\n');
            print_out(text.as_bytes(), "the schemas")
        }
        #[cfg(feature = "ebpf")]
        Command::Check(c) => check(c.output),
        Command::Trace(t) => trace(t),
        Command::Failures(f) => failures(f),
        Command::Completions(c) => completions(c),
        Command::Man(m) => man(m),
        #[cfg(not(feature = "ebpf"))]
        Command::Agent(_) => node_only("agent"),
        #[cfg(not(feature = "ebpf"))]
        Command::Check(_) => node_only("check"),
    }
}

/// A node command typed on the client-only build: why it is not there, exit 2.
#[cfg(not(feature = "ebpf"))]
fn node_only(command: &str) -> ExitCode {
    eprintln!(
        "netprobe: `{command}` runs on a node and needs the full build: this is the client-only \
         build (kubectl-netprobe, built without the cargo feature `ebpf`), which has no kernel \
         programs. It offers cluster mode: `trace` (through the node's agent), `failures`, \
         `schema`, `completions`. On a node, use the netprobe image of deploy/ or a default \
         build (`cargo xtask build`, which installs the eBPF toolchain)."
    );
    ExitCode::from(EXIT_USAGE)
}

/// `netprobe completions SHELL`: the script on stdout.
fn completions(c: CompletionsArgs) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(c.shell, &mut cmd, c.name, &mut script);
    print_out(&script, "the completion script")
}

/// Writes a one-shot command's output to stdout. A reader that stopped early (`netprobe schema |
/// head`) is no error: exit 0 quietly, as a shell pipeline expects; any other write error is
/// said, exit 2.
fn print_out(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: writing {what}: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `netprobe man [COMMAND]`: the page in roff on stdout.
fn man(m: ManArgs) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    let page = match m.command.as_deref() {
        None => clap_mangen::Man::new(cmd),
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => clap_mangen::Man::new(sub.clone()).title(format!("netprobe-{name}")),
            None => {
                eprintln!("netprobe: no command `{name}`");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let mut roff = Vec::new();
    match page.render(&mut roff) {
        Ok(()) => print_out(&roff, "the man page"),
        Err(e) => {
            eprintln!("netprobe: rendering the man page: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// An error at the edge: printed whole (with its causes), exit 2 (130 when interrupted).
fn failed(e: netprobe::Error) -> ExitCode {
    let code = if matches!(e, netprobe::Error::Interrupted) {
        EXIT_INTERRUPTED
    } else {
        EXIT_USAGE
    };
    eprintln!("netprobe: {:#}", anyhow::Error::from(e));
    ExitCode::from(code)
}

#[cfg(feature = "ebpf")]
fn agent(a: AgentArgs) -> ExitCode {
    let opts = netprobe::agent::AgentOptions {
        ring_bytes: a.ring_buffer_kib * 1024,
        metrics_addr: a.metrics_addr,
        node_name: a.node_name,
        rate_limit: a.rate_limit,
        ready_file: a.ready_file,
        program_stats: a.program_stats,
        raw_events: a.raw_events,
        metrics: netprobe::sinks::prometheus::MetricsOptions {
            pod_labels: a.metrics_pod_labels,
            max_series: a.metrics_max_series as usize,
            series_grace: std::time::Duration::from_secs(a.metrics_series_grace),
        },
        max_namespaces: a.max_namespaces,
        events: netprobe::sinks::kube_events::EventsOptions {
            rate: a.events_rate,
            burst: a.events_burst,
            in_flight: a.events_in_flight as usize,
        },
        max_traces: a.max_traces as usize,
    };
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_USAGE);
    };
    // Buffered: the agent flushes once per batch of events.
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    match rt.block_on(netprobe::agent::run(opts, out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

#[cfg(feature = "ebpf")]
fn check(output: Format) -> ExitCode {
    let report = netprobe::probes::check::run();
    match output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        ),
        Format::Text => {
            println!("kernel {}", report.kernel);
            for f in &report.features {
                let mark = match (f.available, f.required) {
                    (true, _) => "ok  ",
                    (false, true) => "FAIL",
                    (false, false) => "no  ",
                };
                println!("{mark} {:<28} {}", f.name, f.detail);
            }
            for w in &report.warnings {
                println!("warn {w}");
            }
            println!(
                "{}",
                if report.tracing_possible() {
                    "tracing can work on this machine"
                } else {
                    "tracing cannot work on this machine"
                }
            );
        }
    }
    if report.tracing_possible() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    }
}

fn trace(t: TraceArgs) -> ExitCode {
    let udp = t.dns || t.proto == Proto::Udp;
    let Some(port) = t.port.or(t.dns.then_some(netprobe_common::DNS_PORT)) else {
        eprintln!("netprobe: --port is required (or --dns)");
        return ExitCode::from(EXIT_USAGE);
    };
    if t.cluster || invoked_as_kubectl_plugin() || !NODE_BUILD {
        return cluster_trace(t, port, udp);
    }
    if t.kube.given() {
        eprintln!(
            "netprobe: --kubeconfig, --context, --as and --request-timeout are for cluster mode (--cluster); a trace on the node reads KUBECONFIG or the in-cluster config"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let opts = trace::TraceOptions {
        ring_bytes: t.ring_buffer_kib * 1024,
        port,
        udp,
        addr: t.addr,
        netns: t.netns,
        duration: t.duration,
        format: t.output,
        rule_trace: !t.no_rule_trace,
        events: t.events,
        count: t.count,
        record: t.record,
        ready_file: t.ready_file,
        pod: t.pod,
        namespace: t.namespace,
        node_name: t.node_name,
        from_pod: t.from_pod,
    };
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let events_mode = opts.events;
    match rt.block_on(trace::run(opts, std::io::stdout().lock())) {
        Ok(_) if events_mode => ExitCode::SUCCESS,
        Ok(s) if s.failed > 0 => ExitCode::from(EXIT_DIAGNOSED),
        Ok(s) if s.attempts == 0 => {
            eprintln!("netprobe: no connection attempt seen");
            ExitCode::from(EXIT_NO_ATTEMPT)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

/// `kubectl netprobe trace`: the node's agent runs the trace; its exit code is ours.
fn cluster_trace(t: TraceArgs, port: u16, udp: bool) -> ExitCode {
    let Some(pod) = t.pod.clone() else {
        eprintln!("netprobe: cluster mode needs --pod");
        return ExitCode::from(EXIT_USAGE);
    };
    if !t.netns.is_empty() || t.record.is_some() {
        eprintln!(
            "netprobe: --netns and --record are for a trace run on the node itself (as root, with the full build); cluster mode traces through the node's agent"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if !t.via_agent {
        return object_trace(t, pod, port, udp);
    }
    let opts = netprobe::cluster::client::Options {
        pod,
        namespace: t.namespace,
        agent_namespace: t.agent_namespace,
        agent_port: t.agent_port,
        format: t.output,
        service_account: t.as_service_account,
        kube: t.kube.options(),
        request: netprobe::cluster::protocol::TraceRequest {
            port,
            udp,
            pod: String::new(),
            addr: t.addr,
            duration: t.duration,
            count: t.count,
            from_pod: t.from_pod,
            events: t.events,
            no_rule_trace: t.no_rule_trace,
        },
    };
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    let run = netprobe::cluster::client::run(opts, &mut stdout, &mut stderr);
    exit_with(rt.block_on(run))
}

/// `kubectl netprobe trace`: a Trace object the node's agent answers in its status.
fn object_trace(t: TraceArgs, pod: String, port: u16, udp: bool) -> ExitCode {
    use netprobe::{cluster::trace_object, model::trace::TraceProtocol};
    if t.addr.is_some() || t.from_pod.is_some() || t.no_rule_trace || t.as_service_account.is_some()
    {
        eprintln!(
            "netprobe: --addr, --from-pod, --no-rule-trace and --as-service-account are not part of a Trace object: it covers the pod's flows on the port (or its DNS lookups), and the API server authorizes you"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let mut spec = netprobe::model::trace::TraceSpec::port(pod, port);
    if t.dns {
        (spec.port, spec.dns) = (None, true);
    } else if udp {
        spec.protocol = TraceProtocol::Udp;
    }
    if let Some(d) = t.duration {
        match trace_object::spec_duration(d) {
            Ok(d) => spec.duration = d,
            Err(e) => {
                eprintln!("netprobe: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    spec.events = t.events;
    let opts = trace_object::Options {
        namespace: t.namespace,
        spec,
        count: t.count,
        keep: t.keep,
        format: t.output,
        kube: t.kube.options(),
    };
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    let code = rt.block_on(async {
        // Registered before the object exists: Ctrl-C or SIGTERM from then on deletes it.
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        let stop = async move {
            tokio::select! {
                () = received(&mut int) => {}
                () = received(&mut term) => {}
            }
        };
        trace_object::run(opts, &mut stdout, &mut stderr, stop).await
    });
    exit_with(code)
}

/// Completes when `signal` arrives (never without one).
async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => drop(s.recv().await),
        None => std::future::pending().await,
    }
}

/// A cluster-mode command's exit code as ours; an error is printed, exit 2.
fn exit_with(result: Result<i32, netprobe::Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(EXIT_USAGE)),
        Err(e) => failed(e),
    }
}

/// `kubectl netprobe failures`: the agents' Events, grouped.
fn failures(f: FailuresArgs) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    use netprobe::cluster::event_failures::{Options, Scope};
    let opts = Options {
        scope: match (f.all_namespaces, f.namespace) {
            (true, _) => Scope::All,
            (false, Some(ns)) => Scope::Namespace(ns),
            (false, None) => Scope::Default,
        },
        query: netprobe::cluster::failures::FailuresQuery {
            since: f.since,
            namespace: None,
            workload: f.workload,
        },
        format: f.output,
        kube: f.kube.options(),
    };
    let run = netprobe::cluster::event_failures::run(opts, &mut stdout, &mut stderr);
    exit_with(rt.block_on(run))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1e300s").is_err(), "an error, not a panic");
        assert!(parse_duration("99999999999999999999h").is_err());
        // Fits a Duration, overflows Instant + Duration: refused before anything starts.
        assert!(parse_duration("99999999999h").is_err());
        assert!(parse_duration("9000000h").is_err());
        assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
        let parse =
            |d: &str| Cli::try_parse_from(["netprobe", "trace", "--port", "1", "--timeout", d]);
        assert!(parse("99999999999h").is_err());
        assert!(parse("1h").is_ok());
        assert_eq!(parse_ring_kib("4096").unwrap(), 4096);
        assert!(parse_ring_kib("3").is_err());
        assert!(parse_ring_kib("1000").is_err());
    }

    #[test]
    fn port_zero_is_refused_not_every_port() {
        let parse = |p: &str| Cli::try_parse_from(["netprobe", "trace", "--port", p]);
        assert!(parse("0").is_err());
        assert!(parse("9500").is_ok());
    }

    #[test]
    fn failures_arguments_are_checked_before_asking_anyone() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["netprobe", "failures"].iter().chain(args).copied())
        };
        assert!(parse(&[]).is_ok());
        assert!(
            parse(&[
                "-n",
                "team-a",
                "--workload",
                "Deployment/x",
                "--since",
                "30m"
            ])
            .is_ok()
        );
        assert!(parse(&["--since", "25h"]).is_err());
        assert!(parse(&["--since", "10"]).is_err());
        assert!(parse(&["-A"]).is_ok());
        assert!(parse(&["-A", "-n", "team-a"]).is_err(), "one scope");
    }

    #[test]
    fn kubectl_flags_parse_on_both_cluster_commands() {
        let parse = |args: &[&str]| Cli::try_parse_from(["netprobe"].iter().chain(args).copied());
        let flags = [
            "--kubeconfig",
            "/tmp/k",
            "--context",
            "prod",
            "--as",
            "alice",
            "--request-timeout",
            "20s",
        ];
        let trace = [
            &["trace", "--cluster", "--pod", "p", "--port", "1"][..],
            &flags,
        ]
        .concat();
        let Command::Trace(t) = parse(&trace).unwrap().command else {
            panic!("trace");
        };
        assert!(t.kube.given());
        let o = t.kube.options();
        assert_eq!(o.context.as_deref(), Some("prod"));
        assert_eq!(o.impersonate.as_deref(), Some("alice"));
        assert_eq!(o.request_timeout, Some(Duration::from_secs(20)));
        let Command::Failures(f) = parse(&[&["failures", "-n", "shop"][..], &flags].concat())
            .unwrap()
            .command
        else {
            panic!("failures");
        };
        assert_eq!(f.namespace.as_deref(), Some("shop"));
        assert_eq!(f.kube.options().kubeconfig, Some(PathBuf::from("/tmp/k")));
        let Command::Failures(f) = parse(&["failures", "--request-timeout", "0"])
            .unwrap()
            .command
        else {
            panic!("failures");
        };
        assert_eq!(f.kube.options().request_timeout, None, "0: kube's defaults");
        let Command::Failures(f) = parse(&["failures"]).unwrap().command else {
            panic!("failures");
        };
        assert!(!f.kube.given());
    }

    #[test]
    fn completions_name_the_commands_for_each_shell() {
        for shell in ["bash", "zsh", "fish"] {
            let Command::Completions(c) = Cli::try_parse_from(["netprobe", "completions", shell])
                .unwrap()
                .command
            else {
                panic!("completions");
            };
            let mut script = Vec::new();
            clap_complete::generate(c.shell, &mut Cli::command(), c.name, &mut script);
            let script = String::from_utf8(script).unwrap();
            for sub in ["trace", "failures", "schema", "completions"] {
                assert!(script.contains(sub), "{shell}: {sub}");
            }
        }
        assert!(Cli::try_parse_from(["netprobe", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
