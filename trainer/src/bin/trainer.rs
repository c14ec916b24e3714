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
            Command::Export(a) => cli::export_cmd(&a)?,
            Command::Predict(a) => {
                if !cli::predict(&a)? {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
