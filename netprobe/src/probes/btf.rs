//! What the programs need from the running kernel's BTF: member offsets (Rust eBPF has no CO-RE)
//! and the names of enums whose numbers differ between kernels (`skb_drop_reason` is the famous
//! one: NETFILTER_DROP is 8 on 6.1 and 12 on 6.14+).

use std::{collections::HashMap, path::Path};

use btf_rs::{Btf, Type};
use netprobe_common::{ConntrackOffsets, KernelOffsets, RouteOffsets};

use crate::error::{Error, Result};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF: `NETPROBE_BTF` if set (a vmlinux BTF file for a kernel built
/// without CONFIG_DEBUG_INFO_BTF, e.g. from BTFHub), else /sys/kernel/btf/vmlinux.
pub fn vmlinux_path() -> std::path::PathBuf {
    std::env::var_os("NETPROBE_BTF")
        .map(Into::into)
        .unwrap_or_else(|| VMLINUX_BTF.into())
}

pub struct KernelBtf {
    btf: Btf,
    /// The same BTF as aya reads it (program loading, tp_btf attach targets).
    aya: aya::Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        Self::from_path(&vmlinux_path())
    }

    pub fn from_path(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Btf {
            path: path.into(),
            reason,
        };
        let btf = Btf::from_file(path).map_err(|e| err(e.to_string()))?;
        let aya = aya::Btf::parse_file(path, aya::Endianness::default())
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { btf, aya })
    }

    pub fn aya(&self) -> &aya::Btf {
        &self.aya
    }

    fn strukt(&self, name: &str) -> Option<btf_rs::Struct> {
        // `possible_net_t` and friends are typedefs of anonymous structs.
        self.btf
            .resolve_types_by_name(name)
            .ok()?
            .into_iter()
            .find_map(|t| match self.strip(t) {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
    }

    /// Byte offset of `path` (dotted members, e.g. `__sk_common.skc_net`) in `struct strukt`,
    /// descending into anonymous structs/unions on the way.
    pub fn offset(&self, strukt: &'static str, path: &'static str) -> Result<u32> {
        let missing = || Error::BtfMember {
            strukt,
            member: path,
        };
        let mut ty = self.strukt(strukt).ok_or_else(missing)?;
        let mut total = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, member_ty) = self.find_member(&ty, part).ok_or_else(missing)?;
            total += off;
            if i + 1 < parts.len() {
                ty = match member_ty {
                    Some(Type::Struct(s)) | Some(Type::Union(s)) => s,
                    _ => return Err(missing()),
                };
            }
        }
        Ok(total)
    }

    /// (byte offset, resolved type) of member `name`, searching anonymous members recursively.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Option<(u32, Option<Type>)> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let mty = self.btf.resolve_chained_type(m).ok().map(|t| self.strip(t));
            if mname == name {
                if m.bitfield_size().is_some_and(|b| b != 0) {
                    return None;
                }
                return Some((m.bit_offset() / 8, mty));
            }
            if mname.is_empty()
                && let Some(Type::Struct(inner) | Type::Union(inner)) = &mty
                && let Some((off, t)) = self.find_member(inner, name)
            {
                return Some((m.bit_offset() / 8 + off, t));
            }
        }
        None
    }

    /// Follows typedefs and qualifiers.
    fn strip(&self, mut t: Type) -> Type {
        loop {
            match &t {
                Type::Typedef(x) => match self.btf.resolve_chained_type(x) {
                    Ok(n) => t = n,
                    Err(_) => return t,
                },
                Type::Const(x) => match self.btf.resolve_chained_type(x) {
                    Ok(n) => t = n,
                    Err(_) => return t,
                },
                Type::Volatile(x) => match self.btf.resolve_chained_type(x) {
                    Ok(n) => t = n,
                    Err(_) => return t,
                },
                _ => return t,
            }
        }
    }

    /// Values → names of a kernel enum (e.g. `skb_drop_reason`), with `strip_prefix` removed.
    pub fn enum_names(&self, name: &str, strip_prefix: &str) -> Result<HashMap<u32, String>> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| Error::BtfMissing {
                what: format!("enum {name}"),
            })?;
        for t in types {
            if let Type::Enum(e) = t {
                let mut out = HashMap::new();
                for m in &e.members {
                    let n = self.btf.resolve_name(m).unwrap_or_default();
                    let n = n.strip_prefix(strip_prefix).unwrap_or(&n).to_string();
                    out.insert(m.val(), n);
                }
                return Ok(out);
            }
        }
        Err(Error::BtfMissing {
            what: format!("enum {name}"),
        })
    }

    /// Number of arguments of a BTF-enabled tracepoint (`btf_trace_<name>` minus its `void *`
    /// context), or `None` when the kernel does not have it.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let types = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?;
        for t in types {
            if let Type::Typedef(td) = t {
                let ptr = self.btf.resolve_chained_type(&td).ok()?;
                let Type::Ptr(p) = ptr else { continue };
                if let Ok(Type::FuncProto(fp)) = self.btf.resolve_chained_type(&p) {
                    return Some(fp.parameters.len().saturating_sub(1));
                }
            }
        }
        None
    }

    /// Offsets of every member the kernel programs read.
    pub fn offsets(&self) -> Result<KernelOffsets> {
        let net_ns = self.offset("net", "ns")?;
        let ns_inum = self.offset("ns_common", "inum")?;
        Ok(KernelOffsets {
            skb_head: self.offset("sk_buff", "head")?,
            skb_network_header: self.offset("sk_buff", "network_header")?,
            skb_transport_header: self.offset("sk_buff", "transport_header")?,
            skb_dev: self.offset("sk_buff", "dev")?,
            skb_sk: self.offset("sk_buff", "sk")?,
            // possible_net_t wraps a single `struct net *net`.
            dev_nd_net: self.offset("net_device", "nd_net")?
                + self.offset("possible_net_t", "net")?,
            dev_ifindex: self.offset("net_device", "ifindex")?,
            net_ns_inum: net_ns + ns_inum,
            sk_net: self.offset("sock", "__sk_common.skc_net")?
                + self.offset("possible_net_t", "net")?,
            sk_daddr: self.offset("sock", "__sk_common.skc_daddr")?,
            sk_rcv_saddr: self.offset("sock", "__sk_common.skc_rcv_saddr")?,
            sk_v6_daddr: self.offset("sock", "__sk_common.skc_v6_daddr")?,
            sk_v6_rcv_saddr: self.offset("sock", "__sk_common.skc_v6_rcv_saddr")?,
            sk_dport: self.offset("sock", "__sk_common.skc_dport")?,
            sk_num: self.offset("sock", "__sk_common.skc_num")?,
            sk_family: self.offset("sock", "__sk_common.skc_family")?,
            sk_state: self.offset("sock", "__sk_common.skc_state")?,
            sk_err: self.offset("sock", "sk_err")?,
            sk_protocol: self.offset("sock", "sk_protocol")?,
            sk_err_soft: self.offset("sock", "sk_err_soft")?,
            // Both structs begin with `struct sock`: offsets from the socket pointer.
            icsk_retransmits: self.offset("inet_connection_sock", "icsk_retransmits")?,
            rst_has_reason: u32::from(self.tracepoint_args("tcp_send_reset").unwrap_or(2) >= 3),
            skb_cb: self.offset("sk_buff", "cb")?,
            tcp_total_retrans: self.offset("tcp_sock", "total_retrans")?,
            inet_sport: self.offset("inet_sock", "inet_sport")?,
        })
    }

    /// Offsets of the route lookup's flow and of the current task's namespace.
    pub fn route_offsets(&self) -> Result<RouteOffsets> {
        Ok(RouteOffsets {
            fl4_iif: self.offset("flowi4", "__fl_common.flowic_iif")?,
            fl4_proto: self.offset("flowi4", "__fl_common.flowic_proto")?,
            fl4_saddr: self.offset("flowi4", "saddr")?,
            fl4_daddr: self.offset("flowi4", "daddr")?,
            fl4_dport: self.offset("flowi4", "uli.ports.dport")?,
            fl4_sport: self.offset("flowi4", "uli.ports.sport")?,
            task_nsproxy: self.offset("task_struct", "nsproxy")?,
            nsproxy_net_ns: self.offset("nsproxy", "net_ns")?,
        })
    }

    /// Where a packet's conntrack entry keeps the original destination. All zero (the drop
    /// program then reads none) on a kernel without conntrack in its BTF: an optional detail.
    pub fn conntrack_offsets(&self) -> ConntrackOffsets {
        let tuple = || -> Result<(u32, u32, u32)> {
            let orig = self.offset("nf_conn", "tuplehash")?
                + self.offset("nf_conntrack_tuple_hash", "tuple")?;
            Ok((
                self.offset("sk_buff", "_nfct")?,
                orig + self.offset("nf_conntrack_tuple", "dst.u3")?,
                orig + self.offset("nf_conntrack_tuple", "dst.u.all")?,
            ))
        };
        let (skb_nfct, ct_orig_daddr, ct_orig_dport) = tuple().unwrap_or_default();
        ConntrackOffsets {
            skb_nfct,
            ct_orig_daddr,
            ct_orig_dport,
            _pad: 0,
        }
    }

    pub fn raw(&self) -> &Btf {
        &self.btf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against the BTF of the machine running the tests (every supported machine has one).
    #[test]
    fn resolves_offsets_and_drop_reasons_from_running_kernel() {
        let btf = KernelBtf::load().expect("kernel BTF");
        let o = btf.offsets().expect("offsets");
        assert!(o.skb_head > 0 && o.skb_network_header > 0 && o.net_ns_inum > 0);
        assert_ne!(o.sk_daddr, o.sk_rcv_saddr);
        // The route lookup's flow and the conntrack entry's original destination (this kernel
        // has conntrack built in).
        let r = btf.route_offsets().expect("route offsets");
        assert!(r.fl4_daddr > r.fl4_saddr && r.fl4_dport > r.fl4_daddr && r.fl4_proto > 0);
        assert!(r.task_nsproxy > 0 && r.nsproxy_net_ns > 0);
        let c = btf.conntrack_offsets();
        assert!(c.skb_nfct > 0 && c.ct_orig_dport > c.ct_orig_daddr && c.ct_orig_daddr > 0);
        let reasons = btf
            .enum_names("skb_drop_reason", "SKB_DROP_REASON_")
            .unwrap();
        let no_socket = reasons
            .iter()
            .find(|(_, n)| n.as_str() == "NO_SOCKET")
            .map(|(v, _)| *v);
        assert!(no_socket.is_some(), "NO_SOCKET present");
        assert!(reasons.values().any(|n| n == "NETFILTER_DROP"));
        assert_eq!(btf.tracepoint_args("kfree_skb").map(|n| n >= 3), Some(true));
    }

    /// `enum sk_rst_reason` (6.10+, with the reason argument of `tcp_send_reset`): the names the
    /// verdict says, prefix stripped, one value each; a kernel without it has neither.
    #[test]
    fn decodes_reset_reasons_from_running_kernel() {
        let btf = KernelBtf::load().expect("kernel BTF");
        let decoded = btf.enum_names("sk_rst_reason", "SK_RST_REASON_");
        if btf.tracepoint_args("tcp_send_reset").unwrap_or(0) < 3 {
            assert!(decoded.is_err(), "no reason argument, no enum");
            return;
        }
        let reasons = decoded.expect("sk_rst_reason");
        let value = |name: &str| reasons.iter().find(|(_, n)| *n == name).map(|(v, _)| *v);
        for name in [
            "NOT_SPECIFIED",
            "NO_SOCKET",
            "TCP_ABORT_ON_CLOSE",
            "TCP_ABORT_ON_LINGER",
            "TCP_ABORT_ON_MEMORY",
            "TCP_STATE",
            "TCP_KEEPALIVE_TIMEOUT",
            "TCP_DISCONNECT_WITH_DATA",
        ] {
            assert!(value(name).is_some(), "{name} in {reasons:?}");
        }
        assert_eq!(value("NOT_SPECIFIED"), Some(0));
        assert!(reasons.values().all(|n| !n.starts_with("SK_RST_REASON_")));
        let o = btf.offsets().expect("offsets");
        assert_eq!(o.rst_has_reason, 1);
        // A closed socket's port is read from inet_sock (past struct sock).
        assert!(o.inet_sport > o.sk_num);
    }
}
