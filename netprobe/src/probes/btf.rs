//! What the programs need from the running kernel's BTF: member offsets (Rust eBPF has no CO-RE)
//! and the names of enums whose numbers differ between kernels (`skb_drop_reason` is the famous
//! one: NETFILTER_DROP is 8 on 6.1 and 12 on 6.14+).
//!
//! Read once per process, and lazily: the file's bytes (5 MiB on 6.18) and where each type
//! record starts, nothing decoded ahead. A general BTF parser builds every type and string of
//! the kernel's ~126 000 types (btf-rs and aya's full parse together held most of a trace's
//! and the agent's ~95 MiB peak). aya gets a BTF of its own that holds only what it reads.

use std::{collections::HashMap, path::Path};

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

/// BTF kinds (include/uapi/linux/btf.h) this reader looks into or steps over.
mod kind {
    pub const PTR: u32 = 2;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const FUNC_PROTO: u32 = 13;

    /// Bytes after the 12-byte common record, for `vlen` members/values/parameters.
    pub fn extra(kind: u32, vlen: usize) -> Option<usize> {
        Some(match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,
            _ => return None,
        })
    }
}

const HEADER_LEN: usize = 24;
const MAGIC: u16 = 0xeb9f;
const RECORD: usize = 12;

/// One type record: the common part, and `rest` (members, values or parameters).
#[derive(Clone, Copy)]
struct Ty<'a> {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Size or referenced type id, by kind.
    size_type: u32,
    rest: &'a [u8],
}

impl Ty<'_> {
    /// Field `field` (a u32) of entry `i` of `rest`, entries `width` bytes wide.
    fn field(&self, i: usize, width: usize, field: usize) -> u32 {
        u32_at(self.rest, i * width + field * 4).unwrap_or(0)
    }
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(off..off + 4)?.try_into().ok()?))
}

pub struct KernelBtf {
    data: Vec<u8>,
    /// Where in `data` the record of type id `i + 1` starts.
    records: Vec<u32>,
    /// The string section's place in `data`.
    strings: std::ops::Range<usize>,
    /// What aya reads of the kernel's BTF (program loading, tp_btf attach targets).
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
        let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::parse(data).map_err(err)
    }

    /// Indexes the type records of a native-endian BTF blob; the error says what is wrong.
    fn parse(data: Vec<u8>) -> std::result::Result<Self, String> {
        let magic = data.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err("not a BTF blob of this machine's byte order".into());
        }
        // hdr_len, type_off, type_len, str_off, str_len
        let field = |i: usize| u32_at(&data, 4 + 4 * i).map(|v| v as usize);
        let [
            Some(hdr_len),
            Some(type_off),
            Some(type_len),
            Some(str_off),
            Some(str_len),
        ] = [0, 1, 2, 3, 4].map(field)
        else {
            return Err("truncated header".into());
        };
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if hdr_len < HEADER_LEN || types.end > data.len() || strings.end > data.len() {
            return Err("sections beyond the end of the file".into());
        }
        let mut records = Vec::new();
        let mut at = types.start;
        while at < types.end {
            let info = u32_at(&data[..types.end], at + 4)
                .ok_or_else(|| format!("type {} truncated", records.len() + 1))?;
            let k = (info >> 24) & 0x1f;
            let extra = kind::extra(k, (info & 0xffff) as usize)
                .ok_or_else(|| format!("type {} has unknown kind {k}", records.len() + 1))?;
            records.push(at as u32);
            at += RECORD + extra;
        }
        if at != types.end {
            return Err(format!("type {} truncated", records.len()));
        }
        let mut btf = Self {
            data,
            records,
            strings,
            aya: aya::Btf::new(),
        };
        btf.aya = btf.for_aya()?;
        Ok(btf)
    }

    pub fn aya(&self) -> &aya::Btf {
        &self.aya
    }

    /// The record of type `id` (0 is void: none).
    fn ty(&self, id: u32) -> Option<Ty<'_>> {
        let at = *self.records.get((id as usize).checked_sub(1)?)? as usize;
        let info = u32_at(&self.data, at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        Some(Ty {
            name_off: u32_at(&self.data, at)?,
            kind,
            vlen,
            kind_flag: info >> 31 == 1,
            size_type: u32_at(&self.data, at + 8)?,
            rest: self
                .data
                .get(at + RECORD..at + RECORD + kind::extra(kind, vlen)?)?,
        })
    }

    /// The string at `off` in the string section ("" when it is not one).
    fn name(&self, off: u32) -> &str {
        let strings = &self.data[self.strings.clone()];
        let s = strings.get(off as usize..).unwrap_or_default();
        let s = &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())];
        std::str::from_utf8(s).unwrap_or_default()
    }

    /// Every type named `name`, of any kind.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (u32, Ty<'a>)> + 'a {
        let strings = &self.data[self.strings.clone()];
        let is_name = move |off: u32| {
            let s = strings.get(off as usize..).unwrap_or_default();
            s.starts_with(name.as_bytes()) && s.get(name.len()) == Some(&0)
        };
        (1..=self.records.len() as u32)
            .filter(move |id| {
                let at = self.records[*id as usize - 1] as usize;
                u32_at(&self.data, at).is_some_and(is_name)
            })
            .filter_map(|id| Some((id, self.ty(id)?)))
    }

    /// Follows typedefs and qualifiers.
    fn strip(&self, mut id: u32) -> Option<Ty<'_>> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                kind::TYPEDEF | kind::CONST | kind::VOLATILE => id = t.size_type,
                _ => return Some(t),
            }
        }
        None
    }

    fn strukt(&self, name: &str) -> Option<Ty<'_>> {
        // `possible_net_t` and friends are typedefs of anonymous structs.
        self.named(name)
            .filter_map(|(id, _)| self.strip(id))
            .find(|t| t.kind == kind::STRUCT && t.vlen > 0)
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
            let (off, member_ty) = self.find_member(ty, part).ok_or_else(missing)?;
            total += off;
            if i + 1 < parts.len() {
                ty = member_ty
                    .filter(|t| matches!(t.kind, kind::STRUCT | kind::UNION))
                    .ok_or_else(missing)?;
            }
        }
        Ok(total)
    }

    /// (byte offset, resolved type) of member `name` of struct or union `s`, searching
    /// anonymous members recursively. A bitfield is not one the programs can read: none.
    fn find_member(&self, s: Ty<'_>, name: &str) -> Option<(u32, Option<Ty<'_>>)> {
        for i in 0..s.vlen {
            let mname = self.name(s.field(i, 12, 0));
            let mty = self.strip(s.field(i, 12, 1));
            let offset = s.field(i, 12, 2);
            let (bits, bitfield) = if s.kind_flag {
                (offset & 0xff_ffff, offset >> 24 != 0)
            } else {
                (offset, false)
            };
            if mname == name {
                return (!bitfield).then_some((bits / 8, mty));
            }
            if mname.is_empty()
                && let Some(inner) = mty.filter(|t| matches!(t.kind, kind::STRUCT | kind::UNION))
                && let Some((off, t)) = self.find_member(inner, name)
            {
                return Some((bits / 8 + off, t));
            }
        }
        None
    }

    /// Values → names of a kernel enum (e.g. `skb_drop_reason`), with `strip_prefix` removed.
    pub fn enum_names(&self, name: &str, strip_prefix: &str) -> Result<HashMap<u32, String>> {
        let e = self
            .named(name)
            .map(|(_, t)| t)
            .find(|t| t.kind == kind::ENUM && t.vlen > 0)
            .ok_or_else(|| Error::BtfMissing {
                what: format!("enum {name}"),
            })?;
        Ok((0..e.vlen)
            .map(|i| {
                let n = self.name(e.field(i, 8, 0));
                (
                    e.field(i, 8, 1),
                    n.strip_prefix(strip_prefix).unwrap_or(n).to_string(),
                )
            })
            .collect())
    }

    /// Number of arguments of a BTF-enabled tracepoint (`btf_trace_<name>` minus its `void *`
    /// context), or `None` when the kernel does not have it.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let name = format!("btf_trace_{name}");
        self.named(&name)
            .filter(|(_, t)| t.kind == kind::TYPEDEF)
            .find_map(|(_, td)| {
                let ptr = self.ty(td.size_type).filter(|t| t.kind == kind::PTR)?;
                let proto = self
                    .ty(ptr.size_type)
                    .filter(|t| t.kind == kind::FUNC_PROTO)?;
                Some(proto.vlen.saturating_sub(1))
            })
    }

    /// The BTF aya is given. aya reads one thing of the kernel's BTF here: the id of the typedef
    /// `btf_trace_<tracepoint>` a tp_btf program attaches to (`BtfTracePoint::load`; the
    /// object has no CO-RE relocations, so the loader gets none). Its full parse decodes every
    /// type; this one holds those typedefs at their ids and a bare `void *` in every other
    /// slot up to the last of them (~45 000 of ~126 000 types on 6.18).
    fn for_aya(&self) -> std::result::Result<aya::Btf, String> {
        let traces: Vec<(u32, Ty<'_>)> = (1..=self.records.len() as u32)
            .filter_map(|id| Some((id, self.ty(id)?)))
            .filter(|(_, t)| {
                t.kind == kind::TYPEDEF && self.name(t.name_off).starts_with("btf_trace_")
            })
            .collect();
        let last = traces.last().map_or(0, |(id, _)| *id) as usize;
        let mut strings = vec![0u8];
        let mut types = vec![0u8; last * RECORD];
        for rec in types.chunks_exact_mut(RECORD) {
            rec[4..8].copy_from_slice(&(kind::PTR << 24).to_ne_bytes());
        }
        for (id, t) in &traces {
            let rec = &mut types[(*id as usize - 1) * RECORD..][..RECORD];
            let name_off = strings.len() as u32;
            strings.extend_from_slice(self.name(t.name_off).as_bytes());
            strings.push(0);
            rec[0..4].copy_from_slice(&name_off.to_ne_bytes());
            rec[4..8].copy_from_slice(&(kind::TYPEDEF << 24).to_ne_bytes());
            rec[8..12].copy_from_slice(&t.size_type.to_ne_bytes());
        }
        let mut blob = Vec::with_capacity(HEADER_LEN + types.len() + strings.len());
        blob.extend_from_slice(&MAGIC.to_ne_bytes());
        blob.extend_from_slice(&[1, 0]);
        for v in [HEADER_LEN, 0, types.len(), types.len(), strings.len()] {
            blob.extend_from_slice(&(v as u32).to_ne_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        aya::Btf::parse(&blob, aya::Endianness::default()).map_err(|e| e.to_string())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::btf::BtfKind;

    /// A BTF blob written by hand, types in id order (from 1).
    struct Blob {
        types: Vec<u32>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        /// Adds a type record; `rest` is its members, values or parameters as u32s.
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, size_type: u32, rest: &[u32]) {
            self.ty_flag(name, kind, vlen, false, size_type, rest);
        }

        fn ty_flag(&mut self, name: &str, k: u32, vlen: u32, flag: bool, st: u32, rest: &[u32]) {
            let name = self.s(name);
            let info = (u32::from(flag) << 31) | (k << 24) | vlen;
            self.types.extend([name, info, st]);
            self.types.extend(rest);
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn bytes(&self) -> Vec<u8> {
            let types: Vec<u8> = self.types.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let mut b = MAGIC.to_ne_bytes().to_vec();
            b.extend([1, 0]);
            let lens = [HEADER_LEN, 0, types.len(), types.len(), self.strings.len()];
            b.extend(lens.iter().flat_map(|v| (*v as u32).to_ne_bytes()));
            b.extend(types);
            b.extend(&self.strings);
            b
        }
    }

    /// Anonymous unions and typedef'd anonymous structs, a bitfield, an empty declaration
    /// before the definition, an enum and a BTF tracepoint.
    fn sample() -> KernelBtf {
        let mut b = Blob::new();
        b.ty("int", 1, 0, 4, &[32]); // 1
        b.ty("outer", kind::STRUCT, 0, 0, &[]); // 2: declared, no members
        let inner_a = b.s("inner_a");
        b.ty("", kind::STRUCT, 1, 8, &[inner_a, 1, 32]); // 3: anonymous, inner_a at byte 4
        b.ty("wrap_t", kind::TYPEDEF, 0, 3, &[]); // 4
        let u_b = b.s("u_b");
        b.ty("", kind::UNION, 1, 4, &[u_b, 1, 0]); // 5
        let (a, w, bits) = (b.s("a"), b.s("w"), b.s("bits"));
        #[rustfmt::skip]
        let members = [
            a, 1, 0,
            0, 5, 64, // the anonymous union at byte 8
            w, 4, 128, // wrap_t at byte 16
            bits, 1, (3 << 24) | 192, // 3 bits at byte 24
        ];
        b.ty_flag("outer", kind::STRUCT, 4, true, 32, &members); // 6
        let (red, blue) = (b.s("C_RED"), b.s("C_BLUE"));
        b.ty("colour", kind::ENUM, 2, 4, &[red, 0, blue, 7]); // 7
        b.ty("", kind::PTR, 0, 0, &[]); // 8: void *
        b.ty("", kind::FUNC_PROTO, 3, 0, &[0, 8, 0, 1, 0, 1]); // 9: (void *, int, int)
        b.ty("", kind::PTR, 0, 9, &[]); // 10
        b.ty("btf_trace_demo", kind::TYPEDEF, 0, 10, &[]); // 11
        b.ty("after", 1, 0, 4, &[32]); // 12
        KernelBtf::parse(b.bytes()).expect("sample BTF")
    }

    #[test]
    fn member_offsets_through_anonymous_members_and_typedefs() {
        let btf = sample();
        assert_eq!(btf.offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset("outer", "u_b").unwrap(), 8);
        assert_eq!(btf.offset("outer", "w.inner_a").unwrap(), 20);
        assert_eq!(btf.offset("wrap_t", "inner_a").unwrap(), 4);
        for (s, m) in [
            ("outer", "bits"),
            ("outer", "nope"),
            ("outer", "a.x"),
            ("none", "a"),
        ] {
            assert!(
                matches!(btf.offset(s, m), Err(Error::BtfMember { .. })),
                "{s}.{m}"
            );
        }
    }

    #[test]
    fn enum_names_and_tracepoint_arguments() {
        let btf = sample();
        let names = btf.enum_names("colour", "C_").unwrap();
        assert_eq!(names.len(), 2);
        assert_eq!((names[&0].as_str(), names[&7].as_str()), ("RED", "BLUE"));
        assert!(matches!(
            btf.enum_names("outer", ""),
            Err(Error::BtfMissing { .. })
        ));
        assert_eq!(btf.tracepoint_args("demo"), Some(2));
        assert_eq!(btf.tracepoint_args("absent"), None);
    }

    /// aya finds the tracepoint's typedef at its id in the blob, and only it.
    #[test]
    fn aya_gets_the_tracepoint_typedefs_at_their_ids() {
        let btf = sample();
        let id = |name: &str| btf.aya().id_by_type_name_kind(name, BtfKind::Typedef).ok();
        assert_eq!(id("btf_trace_demo"), Some(11));
        assert_eq!(id("wrap_t"), None);
    }

    #[test]
    fn malformed_blobs_say_what_is_wrong() {
        let good = {
            let mut b = Blob::new();
            b.ty("outer", kind::STRUCT, 2, 8, &[0, 0, 0, 0, 0, 0]);
            b.bytes()
        };
        assert!(KernelBtf::parse(good.clone()).is_ok());
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        let err = |b: Vec<u8>| KernelBtf::parse(b).err().unwrap_or_default();
        assert!(err(swapped).contains("byte order"));
        assert!(err(good[..10].to_vec()).contains("truncated header"));
        // The type section claims one member more than it holds.
        let mut short = good.clone();
        short[HEADER_LEN + 4] = 3;
        assert!(
            err(short).contains("type 1 truncated"),
            "{}",
            err(good.clone())
        );
        let mut unknown = good.clone();
        unknown[HEADER_LEN + 7] = 31;
        assert!(err(unknown).contains("unknown kind 31"));
        assert!(err(good[..good.len() - 1].to_vec()).contains("beyond the end"));
    }

    /// The BTF given to aya names the tracepoints netprobe attaches to with the ids aya's full
    /// parse finds, on the running kernel.
    #[test]
    fn tracepoint_ids_match_a_full_parse_of_the_running_kernel() {
        let btf = KernelBtf::load().expect("kernel BTF");
        let full = aya::Btf::parse_file(vmlinux_path(), aya::Endianness::default()).unwrap();
        for (_, tp) in super::super::TRACEPOINTS {
            let name = format!("btf_trace_{tp}");
            let ours = btf.aya().id_by_type_name_kind(&name, BtfKind::Typedef);
            let theirs = full.id_by_type_name_kind(&name, BtfKind::Typedef);
            assert_eq!(ours.ok(), theirs.ok(), "{name}");
        }
    }

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
