//! `cargo xtask setup`: installs what building and testing need, on a fresh Debian bookworm
//! machine; idempotent, and seconds when everything is present.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build::{debian_cargo, run_checked, tools_dir};

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
    // pip installs the Helm engine (below).
    "python3-pip",
    "iptables",
    "nftables",
    "conntrack",
    "socat",
    "iperf3",
    "hping3",
    "tcpdump",
];

/// Helm's engine for `helm lint`/`helm template` in the chart tests (netprobe/tests/deploy.rs).
const HELM_PYTHON_SDK: &str = "0.2.2";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM bpf-linker is built against; Debian's rustc must use the same major.
const LLVM_MAJOR: &str = "22";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// `LLVM version: 22.1.8` from `rustc -vV`.
fn llvm_version(rustc_vv: &str) -> Option<&str> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .map(str::trim)
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new(tools_dir().join("bin/bpf-linker"))
        .arg("--version")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split_whitespace();
            f.nth(1) == Some("/sys/kernel/tracing") && f.next() == Some("tracefs")
        })
}

pub fn run() -> Result<()> {
    let mut summary: Vec<String> = Vec::new();

    // 1. Debian packages.
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        summary.push(format!("Debian packages: all {} present", PACKAGES.len()));
    } else {
        if !netprobe_lab::is_root() {
            bail!(
                "packages missing ({}); installing them needs root: run `cargo xtask setup` as root",
                missing.join(" ")
            );
        }
        println!("setup: installing {}", missing.join(" "));
        let mut update = apt_get();
        update.args(["update", "-q"]);
        run_checked(update, "apt-get update")?;
        let mut install = apt_get();
        install
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing);
        run_checked(install, "apt-get install")?;
        summary.push(format!("Debian packages: installed {}", missing.join(" ")));
    }

    // 2. bpf-linker must use the LLVM that Debian's rustc uses.
    let vv = Command::new("/usr/bin/rustc")
        .arg("-vV")
        .output()
        .context("run /usr/bin/rustc -vV (package rustc-web)")?;
    let vv = String::from_utf8_lossy(&vv.stdout).into_owned();
    let llvm = llvm_version(&vv)
        .context("`/usr/bin/rustc -vV` printed no LLVM version")?
        .to_string();
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "Debian's rustc (/usr/bin/rustc) uses LLVM {llvm}, but bpf-linker is built against \
             LLVM {LLVM_MAJOR} (llvm-{LLVM_MAJOR}-dev, feature llvm-{LLVM_MAJOR}): bpf-linker must \
             follow rustc's LLVM — update LLVM_MAJOR and the llvm-{LLVM_MAJOR} names in \
             xtask/src/setup.rs, then delete .tools/ and rerun setup"
        );
    }
    let rustc = vv.lines().next().unwrap_or("rustc ?").to_string();
    summary.push(format!("Debian {rustc}, LLVM {llvm}"));

    // 3. bpf-linker in .tools.
    let linker = tools_dir().join("bin/bpf-linker");
    if let Some(v) = bpf_linker_version() {
        summary.push(format!("bpf-linker: present ({v}, {})", linker.display()));
    } else {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes)"
        );
        let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
        let mut cmd = debian_cargo();
        cmd.env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{LLVM_MAJOR}1_PREFIX"), &prefix)
            .args(["install", "--locked", "--root"])
            .arg(tools_dir())
            .args([
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ]);
        run_checked(cmd, "cargo install bpf-linker")?;
        let v = bpf_linker_version()
            .with_context(|| format!("{} --version fails after install", linker.display()))?;
        summary.push(format!("bpf-linker: built ({v}, {})", linker.display()));
    }

    // 4. The Helm engine for the chart tests: Helm's own Go code as a library, from the PyPI
    //    wheel helm-python-sdk (Helm v4; no helm binary or Go toolchain reaches these machines).
    let helm = tools_dir().join("helm-python");
    if helm.join("helm_python").is_dir() {
        summary.push(format!("helm engine: present ({})", helm.display()));
    } else {
        println!("setup: installing the Helm engine (PyPI helm-python-sdk {HELM_PYTHON_SDK})");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
            .arg(&helm)
            .arg(format!("helm-python-sdk=={HELM_PYTHON_SDK}"));
        run_checked(cmd, "pip install helm-python-sdk")?;
        summary.push(format!("helm engine: installed ({})", helm.display()));
    }

    // 5. tracefs, for classic tracepoints and tracing tools (netprobe itself uses tp_btf).
    if tracefs_mounted() {
        summary.push("tracefs: mounted at /sys/kernel/tracing".into());
    } else {
        let ok = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        summary.push(
            if ok {
                "tracefs: mounted at /sys/kernel/tracing"
            } else {
                "tracefs: could not be mounted (not needed by netprobe, which uses tp_btf)"
            }
            .into(),
        );
    }

    println!("setup:");
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_version_is_read_from_rustc_vv() {
        let vv = "rustc 1.96.0 (x 2026-01-01) (built from a source tarball)\n\
                  binary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\n\
                  LLVM version: 22.1.8\n";
        assert_eq!(llvm_version(vv), Some("22.1.8"));
        assert_eq!(llvm_version("rustc 1.0"), None);
    }
}
