//! Network namespaces: naming them (`ip netns` names or paths), their inode numbers (what the
//! kernel programs report), and running code inside one (a thread that `setns`es, so the rest of
//! the process stays where it is).

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Where `ip netns add` keeps its namespaces (and containerd its `cni-…` ones).
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRef {
    /// `ip netns` name, or the path when it has none.
    pub name: String,
    pub path: PathBuf,
    pub inode: u64,
}

impl NetnsRef {
    /// Does the namespace still exist under its path (a deleted name, or a new namespace
    /// mounted under it, is a different one)?
    pub fn exists(&self) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.inode)
    }

    /// `NAME` (looked up in /run/netns) or a path such as `/proc/1234/ns/net`.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        let path = if name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            Path::new(NETNS_RUN_DIR).join(name_or_path)
        };
        let meta = std::fs::metadata(&path).map_err(|_| Error::UnknownNetns {
            name: name_or_path.to_string(),
            path: path.clone(),
        })?;
        Ok(Self {
            name: name_or_path.to_string(),
            path,
            inode: meta.ino(),
        })
    }

    /// The namespace this process runs in.
    pub fn current() -> Result<Self> {
        let mut me = Self::resolve("/proc/self/ns/net")?;
        me.path = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        me.name = named()
            .ok()
            .and_then(|m| m.get(&me.inode).cloned())
            .unwrap_or_else(|| "(current)".to_string());
        Ok(me)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let file = File::open(&self.path).map_err(|source| self.gone(source))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid fd; affects only this thread, which ends after `f`.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(self.gone(std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn gone(&self, source: std::io::Error) -> Error {
        Error::Netns {
            name: self.name.clone(),
            path: self.path.clone(),
            source,
        }
    }
}

/// inode → name of every namespace in /run/netns.
pub fn named() -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(Error::io(format!("reading {NETNS_RUN_DIR}"), source)),
    };
    for entry in dir.flatten() {
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            out.insert(meta.ino(), entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// Namespaces that a veth of the *current* namespace leads into: on a node, the pods.
/// Candidates are /run/netns entries and every process's namespace; a candidate is a peer when
/// the current namespace's id for it (RTM_GETNSID) is the link-netnsid of one of its veths.
pub fn veth_peers() -> Result<Vec<NetnsRef>> {
    let peer_ids: Vec<i32> = crate::netlink::links()?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .filter_map(|l| l.link_netnsid)
        .collect();
    if peer_ids.is_empty() {
        return Ok(Vec::new());
    }
    let candidates = candidates()?;
    let mut out = Vec::new();
    for (_, ns) in candidates {
        let Ok(file) = File::open(&ns.path) else {
            continue;
        };
        if let Ok(Some(id)) = crate::netlink::nsid_of(file.as_raw_fd())
            && peer_ids.contains(&id)
        {
            out.push(ns);
        }
    }
    Ok(out)
}

/// Every namespace this process can reach by path: /run/netns entries, then each process's.
fn candidates() -> Result<BTreeMap<u64, NetnsRef>> {
    let names = named()?;
    let mut candidates: BTreeMap<u64, NetnsRef> = BTreeMap::new();
    for (ino, name) in &names {
        candidates.insert(
            *ino,
            NetnsRef {
                name: name.clone(),
                path: Path::new(NETNS_RUN_DIR).join(name),
                inode: *ino,
            },
        );
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name();
            if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = p.path().join("ns/net");
            if let Ok(meta) = std::fs::metadata(&path) {
                candidates.entry(meta.ino()).or_insert_with(|| NetnsRef {
                    name: format!("pid:{}", pid.to_string_lossy()),
                    path,
                    inode: meta.ino(),
                });
            }
        }
    }
    Ok(candidates)
}

/// The namespace with inode `inode`: this process's, a /run/netns one, or a process's.
pub fn by_inode(inode: u64) -> Option<NetnsRef> {
    match NetnsRef::current() {
        Ok(me) if me.inode == inode => Some(me),
        _ => candidates().ok()?.remove(&inode),
    }
}
