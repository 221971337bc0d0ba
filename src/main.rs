//! The `narmesh` binary: parse the command line, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    narmesh::memory::limit_arenas();
    let cli = narmesh::cli::Cli::parse();
    narmesh::logging::init();
    match narmesh::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("narmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
