//! The commands of shared/interface.md.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "weir", version, about = "A Layer-4 TCP/UDP load balancer")]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the load balancer until SIGTERM/SIGINT.
    Run {
        /// The config file.
        #[arg(short, long, default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, 2 with every problem listed.
    Check {
        #[arg(short, long, default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Send one admin command to a running instance and print the reply.
    Ctl {
        /// The admin socket.
        #[arg(short, long, conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Read the admin socket's path from this config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The command, e.g. `show backends`, `drain pool/backend --wait --timeout 5m`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Start in-process backends, weir in front of them and a little traffic, and show what happens.
    Demo,
}
