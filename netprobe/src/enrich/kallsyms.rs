//! Code addresses → `function+0xoff`, from /proc/kallsyms (readable addresses need root; with
//! `kptr_restrict` hiding them every address is zero and locations stay numeric).

use std::io::BufRead;

pub struct Kallsyms {
    /// (address, name), sorted by address; text symbols only.
    syms: Vec<(u64, String)>,
}

impl Kallsyms {
    pub fn load() -> Self {
        let syms = std::fs::File::open("/proc/kallsyms")
            .map(|f| Self::parse(std::io::BufReader::new(f)))
            .unwrap_or_default();
        Self { syms }
    }

    pub fn parse(r: impl BufRead) -> Vec<(u64, String)> {
        let mut syms: Vec<(u64, String)> = r
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let ty = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(ty, "t" | "T")).then(|| (addr, name.to_string()))
            })
            .collect();
        syms.sort_unstable_by_key(|(a, _)| *a);
        syms
    }

    pub fn from_symbols(syms: Vec<(u64, String)>) -> Self {
        Self { syms }
    }

    pub fn symbolize(&self, addr: u64) -> String {
        let i = self.syms.partition_point(|(a, _)| *a <= addr);
        match i.checked_sub(1).map(|i| &self.syms[i]) {
            Some((a, name)) if addr - a < 1 << 20 => format!("{name}+{:#x}", addr - a),
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
        let k = Kallsyms::from_symbols(Kallsyms::parse(text.as_bytes()));
        assert_eq!(k.symbolize(0xffffffff81a00099), "tcp_v4_rcv+0x99");
        assert_eq!(k.symbolize(0xffffffff81a0146f), "nft_do_chain+0x46f");
        assert_eq!(k.symbolize(0x10), "0x10");
    }
}
