//! Test support: a k3s-node-shaped lab built only inside network namespaces — a "node"
//! namespace with Calico-style pod wiring (`cali…` veths, /32 routes, proxy ARP, a default
//! route over an in-namespace veth) and pod namespaces — torn down on drop, also when a test
//! panics. Nothing is ever added to the root namespace. See shared/reference/lab.md.
//!
//! Namespace names are `np-<tag>-<pid>-node` and `np-<tag>-<pid>-<pod>`; [`Lab::new`] removes
//! leftovers of processes that no longer exist (a SIGKILLed test run), see
//! [`Lab::cleanup_stale`].

use std::{
    collections::HashSet,
    fmt,
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Component, Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub mod churn;
pub mod dns;
pub mod kubeapi;
pub mod metrics;
pub mod midstream;
pub mod mtu;
pub mod ports;
pub mod process;
pub mod resets;
pub mod rules;
pub mod scan;
pub mod scratch;
pub mod two_nodes;
pub mod underlay;

/// Every lab namespace starts with this.
pub const PREFIX: &str = "np-";
/// The gateway Calico gives every pod (answered by proxy ARP on the node side of the veth).
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Calico sets this MAC on every host-side `cali…` interface.
pub const HOST_IF_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives from [`HOST_IF_MAC`]: the pods' IPv6 gateway.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Longest pod part of a pod namespace name before it is shortened (with a hash suffix).
const POD_PART_MAX: usize = 24;

/// Tags of the labs alive in this process (a tag used twice at once gets a suffix).
static LIVE_TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// True when running as euid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() == 0 }
}

/// Fails loudly when not root: privileged tests must never skip silently.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (it builds network-namespace labs and loads eBPF); run it through `cargo xtask test`"
    );
}

/// st_ino of a named netns (/run/netns/NAME) or of a path.
pub fn netns_inode(name_or_path: &str) -> Result<u64> {
    let path = if name_or_path.contains('/') {
        name_or_path.to_string()
    } else {
        format!("/run/netns/{name_or_path}")
    };
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

fn sha1_hex(s: &str) -> String {
    sha1_smol::Sha1::from(s).digest().to_string()
}

/// Calico's host-side interface name for a workload: "cali" + sha1("<ns>.<pod>")[:11].
pub fn calico_iface(namespace: &str, pod: &str) -> String {
    format!("cali{}", &sha1_hex(&format!("{namespace}.{pod}"))[..11])
}

/// The lab's IPv6 address for a pod: `fd00::<3rd octet>:<4th octet>`, the decimal digits read as
/// hex groups, so 10.42.0.10 → `fd00::10` and 10.42.9.2 → `fd00::9:2`.
pub fn pod_ipv6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, c, d] = ip.octets();
    let group = |o: u8| u16::from_str_radix(&o.to_string(), 16).expect("decimal digits are hex");
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, group(c), group(d))
}

/// A tag usable in a namespace name: `-` (the name's separator) and anything unusual become `_`.
fn tag_part(tag: &str) -> String {
    let t: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if t.is_empty() { "lab".into() } else { t }
}

/// A pod name usable in a namespace name, shortened with a hash suffix when long.
fn pod_part(pod: &str) -> String {
    let p: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if p.len() <= POD_PART_MAX {
        p
    } else {
        format!("{}-{}", &p[..POD_PART_MAX - 7], &sha1_hex(pod)[..6])
    }
}

/// The pid in a lab namespace name `<prefix><tag>-<pid>-…`, if it has that shape.
fn lab_netns_pid(name: &str, prefix: &str) -> Option<u32> {
    let mut parts = name.strip_prefix(prefix)?.split('-');
    let tag = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    (!tag.is_empty() && parts.next().is_some_and(|rest| !rest.is_empty())).then_some(pid)
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones (like this VM).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let roots: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    roots
        .iter()
        .find(|r| **r == "/sys/fs/cgroup")
        .or_else(|| roots.first())
        .map(PathBuf::from)
        .context("no cgroup2 mount in /proc/self/mounts")
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// The pod's network namespace (name in /run/netns).
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, see [`pod_ipv6`].
    pub ip6: Ipv6Addr,
    /// Node-side veth (Calico-named).
    pub host_if: String,
}

/// The outcome of a TCP connect, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// ECONNREFUSED: a RST (closed port, or a REJECT rule) came back.
    Refused,
    /// Nothing came back in time (dropped).
    TimedOut,
    /// Any other error (raw OS error; 0 when there was none).
    Other(i32),
}

impl Connect {
    fn of(r: io::Result<TcpStream>) -> Self {
        match r {
            Ok(_) => Self::Connected,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Self::Refused,
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                Self::TimedOut
            }
            Err(e) => Self::Other(e.raw_os_error().unwrap_or(0)),
        }
    }
}

impl fmt::Display for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connected => write!(f, "connected"),
            Self::Refused => write!(f, "connection refused"),
            Self::TimedOut => write!(f, "i/o timeout"),
            Self::Other(e) => write!(f, "error: {}", io::Error::from_raw_os_error(*e)),
        }
    }
}

/// A node namespace with pods, removed on drop (processes killed, namespaces deleted, cgroup
/// directories removed; errors ignored).
pub struct Lab {
    /// The registered tag (for [`LIVE_TAGS`]).
    tag: String,
    /// `np-<tag>-<pid>`.
    base: String,
    node: String,
    /// Namespaces alive, in creation order.
    namespaces: Vec<String>,
    /// Every namespace name this lab ever used: a recreated pod gets a new one.
    used: HashSet<String>,
    /// Spawned processes and the namespace each runs in.
    children: Vec<(String, Child)>,
    /// cgroup directories this lab created, in creation order.
    cgroups: Vec<PathBuf>,
    next_tmp: usize,
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread inside the named namespace (`setns` affects only that thread).
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let path = if netns.contains('/') {
        netns.to_string()
    } else {
        format!("/run/netns/{netns}")
    };
    let file = File::open(&path).with_context(|| format!("open netns {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid fd affects only this thread, which ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// SIGKILLs a spawned process's whole process group and reaps the process.
fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // The child leads its own process group (spawned with process_group(0)).
        // The group id is our unreaped child's pid, so it is not reused.
        let _ = process::signal_group(child.id(), process::Signal::Kill);
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Lab {
    /// A node namespace `np-<tag>-<pid>-node`: lo up, IPv4 and IPv6 forwarding on, and a
    /// default route over an in-namespace veth pair `npgw0`/`npgw1` (proxy ARP only answers
    /// when the node has a route for 169.254.1.1 through another interface). Needs root.
    pub fn new(tag: &str) -> Result<Self> {
        if !is_root() {
            bail!(
                "netprobe-lab needs root (it creates network namespaces); run the privileged tests through `cargo xtask test`"
            );
        }
        Self::cleanup_stale(PREFIX);
        let tag = {
            let mut live = LIVE_TAGS.lock().unwrap_or_else(|p| p.into_inner());
            let base = tag_part(tag);
            let tag = (1..)
                .map(|n| {
                    if n == 1 {
                        base.clone()
                    } else {
                        format!("{base}_{n}")
                    }
                })
                .find(|t| !live.contains(t))
                .expect("a free tag");
            live.push(tag.clone());
            tag
        };
        let base = format!("{PREFIX}{tag}-{}", std::process::id());
        let node = format!("{base}-node");
        let mut lab = Self {
            tag,
            base,
            node: node.clone(),
            namespaces: Vec::new(),
            used: HashSet::new(),
            children: Vec::new(),
            cgroups: Vec::new(),
            next_tmp: 0,
        };
        lab.add_netns(&node)?;
        lab.sh(
            &node,
            "ip link set lo up
             sysctl -qw net.ipv4.ip_forward=1
             sysctl -qw net.ipv6.conf.all.forwarding=1
             ip link add npgw0 type veth peer name npgw1
             ip link set npgw0 up
             ip link set npgw1 up
             ip route add default dev npgw0",
        )?;
        Ok(lab)
    }

    /// Creates a namespace owned by this lab. A namespace of that name can only be a leftover
    /// of an earlier lab of this process (names carry the pid; live tags are unique).
    fn add_netns(&mut self, name: &str) -> Result<()> {
        if Path::new("/run/netns").join(name).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
        self.used.insert(name.to_string());
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// The node namespace's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Names of the namespaces this lab currently owns (node first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A fresh namespace name for a pod: `np-<tag>-<pid>-<pod>`, with `.2`, `.3`… when the lab
    /// used it before (a recreated pod gets a new namespace, as with a real CNI).
    fn pod_netns_name(&self, pod: &str) -> String {
        let first = format!("{}-{}", self.base, pod_part(pod));
        (1..)
            .map(|n| {
                if n == 1 {
                    first.clone()
                } else {
                    format!("{first}.{n}")
                }
            })
            .find(|n| !self.used.contains(n) && n != &self.node)
            .expect("a free name")
    }

    /// A pod wired the way Calico wires it. Pod side: `eth0` with `<ip>/32` and
    /// [`pod_ipv6`]`/128`, default routes via 169.254.1.1 and [`POD_GATEWAY_V6`]. Node side:
    /// `cali<sha1[:11]>` (MAC ee:ee:ee:ee:ee:ee) with proxy ARP, forwarding and host routes.
    pub fn add_pod(&mut self, namespace: &str, pod: &str, ip: Ipv4Addr) -> Result<Pod> {
        let netns = self.pod_netns_name(pod);
        let host_if = calico_iface(namespace, pod);
        let ip6 = pod_ipv6(ip);
        self.add_netns(&netns)?;
        self.next_tmp += 1;
        let tmp = format!("nptmp{}", self.next_tmp);
        self.sh(
            &self.node,
            &format!(
                "ip link add {host_if} type veth peer name {tmp}
                 ip link set {host_if} address {HOST_IF_MAC}
                 sysctl -qw net.ipv6.conf.{host_if}.accept_dad=0
                 ip link set {tmp} netns {netns}
                 ip link set {host_if} up
                 sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1
                 sysctl -qw net.ipv4.neigh.{host_if}.proxy_delay=0
                 sysctl -qw net.ipv4.conf.{host_if}.forwarding=1
                 sysctl -qw net.ipv6.conf.{host_if}.forwarding=1
                 ip route add {ip}/32 dev {host_if} scope link
                 ip -6 route add {ip6}/128 dev {host_if}"
            ),
        )
        .with_context(|| format!("wire pod {namespace}/{pod} on the node"))?;
        self.sh(
            &netns,
            &format!(
                "ip link set lo up
                 ip link set {tmp} name eth0
                 sysctl -qw net.ipv6.conf.eth0.accept_dad=0
                 ip addr add {ip}/32 dev eth0
                 ip -6 addr add {ip6}/128 dev eth0 nodad
                 ip link set eth0 up
                 ip route add {POD_GATEWAY_V4} dev eth0 scope link
                 ip route add default via {POD_GATEWAY_V4} dev eth0
                 ip -6 route add default via {POD_GATEWAY_V6} dev eth0"
            ),
        )
        .with_context(|| format!("wire pod {namespace}/{pod} in its namespace"))?;
        Ok(Pod {
            namespace: namespace.into(),
            name: pod.into(),
            netns,
            ip,
            ip6,
            host_if,
        })
    }

    /// Deletes a pod like the kubelet and the CNI do: its processes are killed, the node-side
    /// veth (and with it the routes) and the namespace are deleted.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        for (_, c) in self.children.iter_mut().filter(|(ns, _)| ns == &pod.netns) {
            kill_child(c);
        }
        self.children.retain(|(ns, _)| ns != &pod.netns);
        let _ = run(&["ip", "-n", &self.node, "link", "del", &pod.host_if]);
        run(&["ip", "netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| n != &pod.netns);
        Ok(())
    }

    /// `ip netns exec NETNS sh -ec SCRIPT`; stdout on success, the script and its stderr on
    /// failure.
    pub fn sh(&self, netns: &str, script: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "sh", "-ec", script])
            .stdin(Stdio::null())
            .output()
            .context("spawn ip netns exec")?;
        if !out.status.success() {
            bail!(
                "in {netns}: script failed ({}): {}\n--- script ---\n{script}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A background process in a namespace (`ip netns exec NETNS ARGV…`, output discarded, its
    /// own process group), killed and reaped when the lab is dropped. Returns its pid.
    pub fn spawn(&mut self, netns: &str, argv: &[&str]) -> Result<u32> {
        if argv.is_empty() {
            bail!("spawn: empty argv");
        }
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {argv:?} in {netns}"))?;
        let pid = child.id();
        self.children.push((netns.to_string(), child));
        Ok(pid)
    }

    /// Moves `pid` into the cgroup v2 directory `rel` (e.g.
    /// `kubepods/besteffort/pod<uid>/<containerid>`), creating what is missing; what this lab
    /// created is removed on drop (deepest first).
    pub fn join_cgroup(&mut self, pid: u32, rel: &str) -> Result<PathBuf> {
        if !Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            bail!("cgroup path must be relative and plain: {rel}");
        }
        let mut dir = cgroup2_root()?;
        for c in Path::new(rel).components() {
            dir.push(c);
            if !dir.exists() {
                std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                self.cgroups.push(dir.clone());
            }
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("move {pid} into {}", dir.display()))?;
        Ok(dir)
    }

    /// A listening socket created inside the namespace (it stays there). Nothing is spawned;
    /// pass it to [`serve`] to accept connections.
    pub fn listen(&self, netns: &str, addr: SocketAddr) -> Result<TcpListener> {
        in_netns(netns, || TcpListener::bind(addr))?
            .with_context(|| format!("listen on {addr} in {netns}"))
    }

    /// A TCP connect from inside the namespace. A namespace that cannot be entered gives
    /// `Other(errno)`.
    pub fn connect(&self, netns: &str, addr: SocketAddr, timeout: Duration) -> Connect {
        match in_netns(netns, || TcpStream::connect_timeout(&addr, timeout)) {
            Ok(r) => Connect::of(r),
            Err(e) => Connect::Other(
                e.downcast_ref::<io::Error>()
                    .and_then(io::Error::raw_os_error)
                    .unwrap_or(libc::EINVAL),
            ),
        }
    }

    /// Deletes lab namespaces (`<prefix><tag>-<pid>-…`) whose process no longer exists — the
    /// leftovers of a SIGKILLed run. Returns the names removed.
    pub fn cleanup_stale(prefix: &str) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = lab_netns_pid(&name, prefix) else {
                continue;
            };
            if pid != std::process::id()
                && !Path::new(&format!("/proc/{pid}")).exists()
                && run(&["ip", "netns", "del", &name]).is_ok()
            {
                removed.push(name);
            }
        }
        removed
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            kill_child(c);
        }
        if let Ok(root) = cgroup2_root() {
            for dir in self.cgroups.iter().rev() {
                // Processes still inside (not ours) go back to the root first.
                if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines() {
                        let _ = std::fs::write(root.join("cgroup.procs"), pid);
                    }
                }
                let _ = std::fs::remove_dir(dir);
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let mut live = LIVE_TAGS.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|t| t != &self.tag);
    }
}

/// Accepts and drops connections on a background thread (a trivial server).
pub fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_interface_names_match_calico() {
        let want = Command::new("sh")
            .args([
                "-c",
                "printf %s financial-inference.seldon-scheduler-0 | sha1sum | cut -c1-11",
            ])
            .output()
            .unwrap();
        let want = format!("cali{}", String::from_utf8_lossy(&want.stdout).trim());
        assert_eq!(want.len(), 15, "sha1sum ran");
        assert_eq!(
            calico_iface("financial-inference", "seldon-scheduler-0"),
            want
        );
        assert_eq!(calico_iface("a", "b").len(), 15, "fits IFNAMSIZ");
    }

    #[test]
    fn sha1_matches_known_vectors() {
        assert_eq!(sha1_hex("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(sha1_hex(""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    }

    #[test]
    fn pod_ipv6_reads_the_last_octets_as_hex_digits() {
        assert_eq!(
            pod_ipv6("10.42.0.10".parse().unwrap()),
            "fd00::10".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_ipv6("10.42.9.2".parse().unwrap()),
            "fd00::9:2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_ipv6("10.42.255.255".parse().unwrap()),
            "fd00::255:255".parse::<Ipv6Addr>().unwrap()
        );
        assert_ne!(
            pod_ipv6("10.42.1.10".parse().unwrap()),
            pod_ipv6("10.42.0.10".parse().unwrap())
        );
    }

    #[test]
    fn gateway_v6_is_the_eui64_link_local_of_calicos_mac() {
        // ee:ee:ee:ee:ee:ee → flip the U/L bit (ec), insert ff:fe.
        assert_eq!(
            POD_GATEWAY_V6,
            "fe80::ecee:eeff:feee:eeee".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn namespace_name_parts() {
        assert_eq!(tag_part("s1"), "s1");
        assert_eq!(tag_part("s1-legacy"), "s1_legacy");
        assert_eq!(tag_part(""), "lab");
        assert_eq!(pod_part("mlserver-0"), "mlserver-0");
        let long = pod_part("a-very-long-statefulset-name-that-goes-on-0");
        assert_eq!(long.len(), POD_PART_MAX);
        assert!(long.starts_with("a-very-long-state-"), "{long}");
        assert_ne!(
            long,
            pod_part("a-very-long-statefulset-name-that-goes-on-1")
        );
        assert_eq!(pod_part("we/ird name"), "we_ird_name");
    }

    #[test]
    fn stale_names_are_recognised_by_their_pid() {
        assert_eq!(lab_netns_pid("np-s2-1234-node", "np-"), Some(1234));
        assert_eq!(lab_netns_pid("np-s2-1234-mlserver-0", "np-"), Some(1234));
        assert_eq!(lab_netns_pid("np-storm-30459-1", "np-"), Some(30459));
        assert_eq!(lab_netns_pid("np-s1_legacy-77-node", "np-"), Some(77));
        // Not a lab's shape: never touched.
        assert_eq!(lab_netns_pid("np-s1-legacy-77-node", "np-"), None);
        assert_eq!(lab_netns_pid("np-s2-1234", "np-"), None);
        assert_eq!(lab_netns_pid("np--1234-node", "np-"), None);
        assert_eq!(lab_netns_pid("t-pod", "np-"), None);
        assert_eq!(lab_netns_pid("cni-1234-5678", "np-"), None);
    }

    #[test]
    fn connect_outcomes_read_like_client_errors() {
        assert_eq!(Connect::Connected.to_string(), "connected");
        assert_eq!(Connect::Refused.to_string(), "connection refused");
        assert_eq!(Connect::TimedOut.to_string(), "i/o timeout");
        assert!(
            Connect::Other(libc::EHOSTUNREACH)
                .to_string()
                .contains("o route to host"),
            "{}",
            Connect::Other(libc::EHOSTUNREACH)
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Connect::of(Err(refused)), Connect::Refused);
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(Connect::of(Err(timed_out)), Connect::TimedOut);
        let unreachable = io::Error::from_raw_os_error(libc::ENETUNREACH);
        assert_eq!(
            Connect::of(Err(unreachable)),
            Connect::Other(libc::ENETUNREACH)
        );
    }

    #[test]
    fn entering_a_missing_namespace_is_an_error() {
        assert!(in_netns("np-no-such-namespace-0-x", || ()).is_err());
    }
}
