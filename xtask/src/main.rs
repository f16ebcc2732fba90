//! netprobe's task runner: `cargo xtask setup | build | test | demo`.

mod build;
mod demo;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netprobe's setup, build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and lab tools (idempotent; seconds when all is present).
    Setup,
    /// Build the kernel programs and the netprobe binary that embeds them.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI runs: setup, build, fmt, clippy (userspace and eBPF), unit and privileged tests.
    Test {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Run only one stage.
        #[arg(long, value_enum)]
        only: Option<test::Stage>,
    },
    /// Set up, build, run the S2 and FORWARD-DROP labs and print what netprobe saw.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => build::build(release),
        Cmd::Test { skip_setup, only } => test::run(skip_setup, only),
        Cmd::Demo => demo::run(),
    }
}
