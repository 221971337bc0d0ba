//! The `narmesh` command line: argument parsing and one function per subcommand.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::nix::{self, SecretKey};

/// narmesh: share every Nix build across your build hosts, without slowing the build.
#[derive(Debug, Parser)]
#[command(name = "narmesh", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a Nix binary cache signing key pair (like `nix-store --generate-binary-cache-key`).
    Keygen {
        /// Key name, conventionally `<host>-1`.
        name: String,
        /// Where to write the secret key (mode 0600).
        secret_file: PathBuf,
        /// Where to write the public key.
        public_file: PathBuf,
    },
    /// Write the NAR serialization of PATH to stdout (like `nix-store --dump`).
    Nar {
        /// A file, directory or symlink.
        path: PathBuf,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen {
            name,
            secret_file,
            public_file,
        } => keygen(&name, &secret_file, &public_file),
        Command::Nar { path } => nar(&path),
    }
}

fn keygen(name: &str, secret_file: &Path, public_file: &Path) -> anyhow::Result<()> {
    let key = SecretKey::generate(name)?;
    write_file(secret_file, key.to_nix_string().as_bytes(), 0o600)
        .with_context(|| format!("writing the secret key to {}", secret_file.display()))?;
    write_file(public_file, key.public().to_string().as_bytes(), 0o644)
        .with_context(|| format!("writing the public key to {}", public_file.display()))?;
    Ok(())
}

/// Write `data` to `path` with `mode` (also when the file already exists), fsync'd.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()
}

fn nar(path: &Path) -> anyhow::Result<()> {
    let stdout = io::stdout().lock();
    match nix::nar::dump(path, stdout) {
        Ok(_) => Ok(()),
        Err(nix::nar::NarError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.into()),
    }
}
