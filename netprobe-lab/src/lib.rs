//! Test support: a k3s-node-shaped lab built only inside network namespaces — a "node"
//! namespace with Calico-style pod wiring (`cali…` veths, /32 routes, proxy ARP, a default
//! route over an in-namespace veth) and pod namespaces — torn down on drop, also when a test
//! panics. Nothing is ever added to the root namespace. See shared/reference/lab.md.

use std::{
    fmt,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub mod kubeapi;
pub mod rules;

const PREFIX: &str = "np-";

/// Fails loudly when not root: privileged tests must never skip silently.
pub fn require_root() {
    // SAFETY: geteuid never fails.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
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

/// Calico's host-side interface name for a workload: "cali" + sha1("<ns>.<pod>")[:11].
pub fn calico_iface(namespace: &str, pod: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{namespace}.{pod}"))
        .digest()
        .to_string();
    format!("cali{}", &digest[..11])
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Node-side veth (Calico-named).
    pub host_if: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    Connected,
    Refused,
    TimedOut,
    Other(i32),
}

impl fmt::Display for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connected => write!(f, "connected"),
            Self::Refused => write!(f, "connection refused"),
            Self::TimedOut => write!(f, "i/o timeout"),
            Self::Other(e) => write!(f, "error {}", io::Error::from_raw_os_error(*e)),
        }
    }
}

pub struct Lab {
    tag: String,
    node: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Never reused, so a recreated pod gets a new namespace name.
    next_id: usize,
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread inside the named namespace.
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let file =
        File::open(format!("/run/netns/{netns}")).with_context(|| format!("open netns {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid fd affects only this thread, which ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {netns}: {}", io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

impl Lab {
    /// A node namespace `np-<tag>-<pid>-node` with forwarding on and a default route over an
    /// in-namespace veth pair (proxy ARP only answers when such a route exists).
    pub fn new(tag: &str) -> Result<Self> {
        require_root();
        Self::cleanup_stale();
        let tag = format!("{PREFIX}{tag}-{}", std::process::id());
        let node = format!("{tag}-node");
        let mut lab = Self {
            tag,
            node: node.clone(),
            namespaces: Vec::new(),
            children: Vec::new(),
            next_id: 1,
        };
        let _ = run(&["ip", "netns", "del", &node]);
        run(&["ip", "netns", "add", &node])?;
        lab.namespaces.push(node.clone());
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

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A pod wired the way Calico wires it.
    pub fn add_pod(&mut self, namespace: &str, pod: &str, ip: Ipv4Addr) -> Result<Pod> {
        let netns = format!("{}-{}", self.tag, self.next_id);
        self.next_id += 1;
        let host_if = calico_iface(namespace, pod);
        let _ = run(&["ip", "netns", "del", &netns]);
        run(&["ip", "netns", "add", &netns])?;
        self.namespaces.push(netns.clone());
        let tmp = format!("nptmp{}", self.next_id);
        self.sh(
            &self.node,
            &format!(
                "ip link add {host_if} type veth peer name {tmp}
                 ip link set {tmp} netns {netns}
                 ip link set {host_if} up
                 sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1
                 sysctl -qw net.ipv4.neigh.{host_if}.proxy_delay=0
                 sysctl -qw net.ipv4.conf.{host_if}.forwarding=1
                 ip route add {ip}/32 dev {host_if} scope link"
            ),
        )?;
        self.sh(
            &netns,
            &format!(
                "ip link set lo up
                 ip link set {tmp} name eth0
                 ip addr add {ip}/32 dev eth0
                 ip link set eth0 up
                 ip route add 169.254.1.1 dev eth0 scope link
                 ip route add default via 169.254.1.1 dev eth0"
            ),
        )?;
        Ok(Pod {
            namespace: namespace.into(),
            name: pod.into(),
            netns,
            ip,
            host_if,
        })
    }

    /// Deletes a pod's namespace (its veth pair goes with it), like a pod being deleted.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        run(&["ip", "netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| n != &pod.netns);
        Ok(())
    }

    /// `sh -ec SCRIPT` inside a namespace; stdout on success, stderr and the script on failure.
    pub fn sh(&self, netns: &str, script: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "sh", "-ec", script])
            .output()
            .context("spawn ip netns exec")?;
        if !out.status.success() {
            bail!(
                "in {netns}: `{script}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A background process in a namespace, killed when the lab is dropped.
    pub fn spawn(&mut self, netns: &str, argv: &[&str]) -> Result<u32> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {argv:?} in {netns}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// A listening socket created inside the namespace (it stays there).
    pub fn listen(&self, netns: &str, addr: SocketAddr) -> Result<TcpListener> {
        in_netns(netns, || TcpListener::bind(addr))?
            .with_context(|| format!("listen on {addr} in {netns}"))
    }

    /// A TCP connect from inside the namespace.
    pub fn connect(&self, netns: &str, addr: SocketAddr, timeout: Duration) -> Connect {
        let r =
            in_netns(netns, || TcpStream::connect_timeout(&addr, timeout)).expect("enter netns");
        match r {
            Ok(_) => Connect::Connected,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Connect::Refused,
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                Connect::TimedOut
            }
            Err(e) => Connect::Other(e.raw_os_error().unwrap_or(0)),
        }
    }

    /// Removes leftover lab namespaces of test processes that no longer exist (a SIGKILLed run).
    pub fn cleanup_stale() {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid = rest.split('-').find_map(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = run(&["ip", "netns", "del", &name]);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
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
        // printf %s financial-inference.seldon-scheduler-0 | sha1sum
        let want = Command::new("sh")
            .args([
                "-c",
                "printf %s financial-inference.seldon-scheduler-0 | sha1sum | cut -c1-11",
            ])
            .output()
            .unwrap();
        let want = format!("cali{}", String::from_utf8_lossy(&want.stdout).trim());
        assert_eq!(
            calico_iface("financial-inference", "seldon-scheduler-0"),
            want
        );
        assert_eq!(calico_iface("a", "b").len(), 15, "fits IFNAMSIZ");
    }
}
