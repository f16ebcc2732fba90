//! Code addresses → `function+0xoff`, from /proc/kallsyms (readable addresses need root; with
//! `kptr_restrict` hiding them every address is zero and locations stay numeric).

use std::io::BufRead;

/// The kernel's text symbols, held compactly: ~120 000 of them on 6.18, which as one `String`
/// each took ~9 MiB of every netprobe process (the agent and each trace), ~5 MiB this way.
#[derive(Default)]
pub struct Kallsyms {
    /// (address, start of its name in `names`, length), sorted by address.
    syms: Vec<(u64, u32, u32)>,
    names: String,
}

impl Kallsyms {
    pub fn load() -> Self {
        std::fs::File::open("/proc/kallsyms")
            .map(|f| Self::parse(std::io::BufReader::new(f)))
            .unwrap_or_default()
    }

    pub fn parse(mut r: impl BufRead) -> Self {
        let mut k = Self::default();
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            let mut it = line.split_whitespace();
            if let (Some(addr), Some("t" | "T"), Some(name)) = (it.next(), it.next(), it.next())
                && let Ok(addr) = u64::from_str_radix(addr, 16)
                && addr != 0
            {
                k.syms.push((addr, k.names.len() as u32, name.len() as u32));
                k.names.push_str(name);
            }
            line.clear();
        }
        k.syms.sort_unstable_by_key(|(a, ..)| *a);
        k.syms.shrink_to_fit();
        k.names.shrink_to_fit();
        k
    }

    pub fn symbolize(&self, addr: u64) -> String {
        let i = self.syms.partition_point(|(a, ..)| *a <= addr);
        match i.checked_sub(1).map(|i| self.syms[i]) {
            Some((a, start, len)) if addr - a < 1 << 20 => {
                let name = &self.names[start as usize..(start + len) as usize];
                format!("{name}+{:#x}", addr - a)
            }
            _ => format!("{addr:#x}"),
        }
    }

    pub fn available(&self) -> bool {
        !self.syms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizes_with_offsets() {
        let text = "ffffffff81000000 T _stext\nffffffff81a00000 t tcp_v4_rcv\nffffffff81a01000 T nft_do_chain\n0000000000000000 T hidden\nffffffff82000000 d data_sym\n";
        let k = Kallsyms::parse(text.as_bytes());
        assert_eq!(k.symbolize(0xffffffff81a00099), "tcp_v4_rcv+0x99");
        assert_eq!(k.symbolize(0xffffffff81a0146f), "nft_do_chain+0x46f");
        assert_eq!(k.symbolize(0x10), "0x10");
    }
}
