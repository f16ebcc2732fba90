//! netprobe's task runner: `cargo xtask setup | build | test | demo`.

mod build;
mod demo;
mod setup;
mod test;

use std::process::ExitCode;

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
    /// Build the kernel programs and the netprobe binary that embeds them
    /// (target/debug/netprobe, or target/release/netprobe with --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI runs: setup, build, fmt, clippy (userspace and eBPF), unit and privileged
    /// tests; stops at the first failure.
    Test {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Run only this stage (setup and build still run).
        #[arg(long, value_enum)]
        only: Option<test::Stage>,
    },
    /// Set up, build, run k3s-node-shaped labs (S2, FORWARD DROP, S1) traced by netprobe and
    /// print what it saw. Root only.
    Demo {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Run only these scenarios (repeatable; default: all).
        #[arg(long, value_enum)]
        scenario: Vec<demo::Scenario>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line; no backtrace noise.
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => build::build(release),
        Cmd::Test { skip_setup, only } => test::run(skip_setup, only),
        Cmd::Demo {
            skip_setup,
            scenario,
        } => demo::run(skip_setup, &scenario),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
