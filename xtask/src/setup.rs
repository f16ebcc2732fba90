//! `cargo xtask setup`: installs what building and testing need, on a fresh Debian bookworm
//! machine; idempotent and fast when everything is present.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build::{run_checked, tools_dir};

const PACKAGES: &[&str] = &[
    // The eBPF toolchain (see shared/reference/toolchain.md).
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "llvm-22-dev",
    "bpftool",
    // Lab tools.
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "socat",
    "iperf3",
    "hping3",
    "tcpdump",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
    } else {
        println!("setup: installing {}", missing.join(" "));
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        run_checked(update, "apt-get update")?;
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing);
        run_checked(cmd, "apt-get install")?;
    }

    // bpf-linker must use the LLVM that Debian's rustc uses.
    let vv = Command::new("/usr/bin/rustc")
        .arg("-vV")
        .output()
        .context("run /usr/bin/rustc -vV")?;
    let vv = String::from_utf8_lossy(&vv.stdout);
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("?")
        .to_string();
    if !llvm.starts_with("22.") {
        bail!(
            "Debian's rustc uses LLVM {llvm}, bpf-linker is built for LLVM 22: update the llvm-22 pins in xtask/src/setup.rs"
        );
    }

    let linker = tools_dir().join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        println!("setup: bpf-linker present ({})", linker.display());
    } else {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
        );
        let mut cmd = crate::build::debian_cargo();
        cmd.env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "--locked", "--root"])
            .arg(tools_dir())
            .args([
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]);
        run_checked(cmd, "cargo install bpf-linker")?;
    }

    // Classic tracepoints and tracing tools want tracefs; netprobe itself uses tp_btf.
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .contains(" /sys/kernel/tracing ");
    if !mounted {
        let ok = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        println!(
            "setup: tracefs {}",
            if ok {
                "mounted"
            } else {
                "not mountable here (netprobe does not need it)"
            }
        );
    }
    println!("setup: done (LLVM {llvm})");
    Ok(())
}
