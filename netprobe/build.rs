//! Builds the kernel programs (netprobe-ebpf, for bpfel-unknown-none) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`. Needs the toolchain `cargo xtask setup` installs and the
//! environment `cargo xtask build` sets (Debian's rustc first in PATH, RUSTC_BOOTSTRAP=aya_ebpf).
//!
//! `NETPROBE_EBPF_TOOLCHAIN=debian` (set by xtask) removes rustup from this script's PATH: cargo
//! prepends `~/.cargo/bin` for subcommands such as `cargo clippy`, and aya-build switches to
//! `rustup run nightly … -Z build-std` whenever it finds rustup, which needs rust-src.
//! `AYA_BUILD_SKIP=1` skips the eBPF build (lint-only jobs); the embedded object is then empty
//! and the binary says so when it tries to load it.
//!
//! Without the `ebpf` feature (the client-only kubectl-netprobe) nothing is built: the object
//! is empty, no eBPF toolchain is needed, and the node commands are not offered.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NETPROBE_EBPF_TOOLCHAIN");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        write_placeholder()?;
    }
    build_objects()
}

/// An empty object: what a build without the kernel programs embeds.
fn write_placeholder() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    std::fs::write(std::path::Path::new(&out_dir).join("netprobe"), b"")
        .context("placeholder object")
}

/// The client-only build embeds no kernel programs.
#[cfg(not(feature = "ebpf"))]
fn build_objects() -> anyhow::Result<()> {
    write_placeholder()
}

#[cfg(feature = "ebpf")]
fn build_objects() -> anyhow::Result<()> {
    if std::env::var("NETPROBE_EBPF_TOOLCHAIN").is_ok_and(|v| v == "debian") {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let kept: Vec<_> = std::env::split_paths(&path)
            .filter(|d| !d.join("rustup").exists())
            .collect();
        let kept = std::env::join_paths(kept).context("PATH")?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PATH", kept) };
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../netprobe-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netprobe-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
