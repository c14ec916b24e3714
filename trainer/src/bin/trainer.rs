use std::process::ExitCode;

use clap::Parser;
use trainer::cli::{self, Cli, Command};

fn main() -> ExitCode {
    runtime::cli::run_main(|| {
        match Cli::parse().command {
            Command::Init(a) => cli::init(&a)?,
            Command::Finetune(a) => {
                cli::finetune(&a)?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
