//! The "Debian route" environment: Debian's rustc 1.96 + prebuilt `core` for bpfel, bpf-linker
//! from `.tools`, rustup's proxies out of PATH (aya-build changes behaviour when it finds rustup).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

pub fn tools_dir() -> PathBuf {
    repo_root().join(".tools")
}

/// `/usr/bin/cargo` with a sanitized environment; every build, lint and test goes through it.
pub fn debian_cargo() -> Command {
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(repo_root());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let cargo_set = k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR";
        let rust_set = matches!(
            k.as_str(),
            "RUSTUP_TOOLCHAIN"
                | "RUSTC"
                | "RUSTDOC"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTFLAGS"
                | "CARGO"
                | "RUSTUP_HOME"
        );
        if cargo_set || rust_set {
            cmd.env_remove(&k);
        }
    }
    cmd.env(
        "PATH",
        format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin",
            tools_dir().join("bin").display()
        ),
    );
    // aya-ebpf needs one unstable feature; naming the crate keeps build-std off.
    cmd.env("RUSTC_BOOTSTRAP", "aya_ebpf");
    cmd.env("NETPROBE_EBPF_TOOLCHAIN", "debian");
    cmd
}

pub fn run_checked(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn build(release: bool) -> Result<()> {
    let mut cmd = debian_cargo();
    cmd.args(["build", "-p", "netprobe"]);
    if release {
        cmd.arg("--release");
    }
    run_checked(cmd, "cargo build -p netprobe")?;
    println!(
        "built {}",
        repo_root()
            .join("target")
            .join(if release { "release" } else { "debug" })
            .join("netprobe")
            .display()
    );
    Ok(())
}
