use which::which;

/// Rebuild when bpf-linker changes: rustc calls it from PATH for the bpf target, and the object
/// it produces depends on its LLVM.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => {
            println!("cargo:warning=bpf-linker not found in PATH ({e}); run `cargo xtask setup`")
        }
    }
}
