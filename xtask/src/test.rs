//! `cargo xtask test`: what CI runs, in order, stopping at the first failure.

use std::process::Command;

use anyhow::{Result, bail};

use crate::build::{debian_cargo, repo_root, run_checked};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Lint,
    Unit,
    Privileged,
}

fn banner(s: &str) {
    println!("\n==== {s} ====");
}

pub fn run(skip_setup: bool, only: Option<Stage>) -> Result<()> {
    let want = |s: Stage| only.is_none_or(|o| o == s);
    if !skip_setup {
        banner("setup");
        crate::setup::run()?;
    }
    banner("build");
    crate::build::build(false)?;

    if want(Stage::Lint) {
        banner("cargo fmt --check");
        // rustfmt comes from rustup (Debian ships none): the cargo that started xtask.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut fmt = Command::new(cargo);
        fmt.current_dir(repo_root())
            .args(["fmt", "--all", "--", "--check"]);
        run_checked(fmt, "cargo fmt --check")?;

        // `cargo clippy` is an external subcommand: cargo would put ~/.cargo/bin (rustup's clippy,
        // without a bpfel `core`) first in PATH. Debian's cargo-clippy is run directly instead.
        banner("clippy (userspace)");
        let mut clippy = retarget(debian_cargo(), "/usr/bin/cargo-clippy");
        clippy.args([
            "clippy",
            "--workspace",
            "--exclude",
            "netprobe-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        run_checked(clippy, "clippy (userspace)")?;

        banner("clippy (eBPF, bpfel-unknown-none)");
        let mut ebpf = retarget(debian_cargo(), "/usr/bin/cargo-clippy");
        ebpf.env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
        ebpf.args([
            "clippy",
            "-p",
            "netprobe-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ]);
        ebpf.arg(repo_root().join("target/ebpf-lint"));
        ebpf.args(["--", "-D", "warnings"]);
        run_checked(ebpf, "clippy (eBPF)")?;
    }

    if want(Stage::Unit) {
        banner("unit tests");
        let mut unit = debian_cargo();
        unit.args([
            "test",
            "--workspace",
            "--exclude",
            "netprobe-ebpf",
            "--lib",
            "--bins",
        ]);
        run_checked(unit, "unit tests")?;
    }

    if want(Stage::Privileged) {
        banner("privileged tests (real kernel programs, netns labs)");
        // SAFETY: geteuid never fails.
        if unsafe { libc_geteuid() } != 0 {
            bail!(
                "privileged tests need root: they load eBPF programs and build network-namespace labs"
            );
        }
        let mut privileged = debian_cargo();
        privileged.env("RUST_BACKTRACE", "1");
        privileged.args([
            "test",
            "--workspace",
            "--exclude",
            "netprobe-ebpf",
            "--test",
            "*",
            "--",
            "--test-threads=1",
        ]);
        run_checked(privileged, "privileged tests")?;
    }
    banner("all green");
    Ok(())
}

/// The same environment as `cmd`, for another program.
fn retarget(cmd: Command, program: &str) -> Command {
    let mut out = Command::new(program);
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    out
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
