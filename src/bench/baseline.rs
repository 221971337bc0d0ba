//! The baselines `narmesh bench` measures in the same run as narmesh itself: a plain TCP copy of
//! the same NAR bytes on loopback into files, and the seed approach (a post-build hook running
//! `nix copy` per build) for the same paths. (Plain S3 PUTs are in [`super::s3`].)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::synth::WorkPath;
use crate::nix::{nar, store_db};

/// Write each path's NAR into `dir` (`<i>.nar`), for the baselines to send the same bytes.
pub fn dump_nars(root: &Path, paths: &[WorkPath], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let file = dir.join(format!("{i}.nar"));
            let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&file)?);
            nar::dump(&store_db::real_path(root, &p.path), out)
                .with_context(|| format!("NAR of {}", p.path))?;
            Ok(file)
        })
        .collect()
}

/// Send each file over its own loopback TCP connection, one after another, the receiver writing
/// it into a file in `dest`; the total wall time.
pub fn tcp_copy(files: &[PathBuf], dest: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dest)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let n = files.len();
    let dest = dest.to_owned();
    let started = Instant::now();
    let rx = std::thread::spawn(move || -> std::io::Result<()> {
        for i in 0..n {
            let (mut s, _) = listener.accept()?;
            let mut out = std::fs::File::create(dest.join(format!("{i}.nar")))?;
            std::io::copy(&mut s, &mut out)?;
        }
        Ok(())
    });
    for f in files {
        let mut s = std::net::TcpStream::connect(addr)?;
        std::io::copy(&mut std::fs::File::open(f)?, &mut s)?;
    }
    rx.join()
        .map_err(|_| anyhow::anyhow!("the TCP receiver panicked"))??;
    Ok(started.elapsed())
}

/// The `nix` client, if one is installed.
pub fn find_nix() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("nix"))
        .find(|p| p.is_file())
}

/// The seed approach: for each path, what a post-build hook running
/// `nix copy --to TARGET $OUT_PATHS` blocks the build loop for (one after another, as Nix runs
/// the hook). Nix runs with its own configuration in `work` and the store at `root`.
pub fn seed_hook(
    nix: &Path,
    root: &Path,
    target: &str,
    paths: &[WorkPath],
    work: &Path,
    mut progress: impl FnMut(),
) -> anyhow::Result<Vec<Duration>> {
    let conf = work.join("nix-conf");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "store = {}\nbuild-users-group =\nexperimental-features = nix-command\n\
             substituters =\nrequire-sigs = false\nconnect-timeout = 5\n",
            root.display()
        ),
    )?;
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let started = Instant::now();
        let res = Command::new(nix)
            .args(["copy", "--to", target])
            .arg(p.path.full())
            .env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", "/dev/null")
            .env("XDG_CACHE_HOME", work.join("cache"))
            .env_remove("NIX_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", nix.display()))?;
        out.push(started.elapsed());
        anyhow::ensure!(
            res.status.success(),
            "the seed approach's `nix copy --to {target} {}` failed: {}",
            p.path,
            String::from_utf8_lossy(&res.stderr).trim()
        );
        progress();
    }
    Ok(out)
}
