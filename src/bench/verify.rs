//! Checking what the peers serve: every NAR fetched from a node's HTTP cache (which fetches it
//! over the mesh on demand) and compared with its narinfo's NarHash and NarSize, timed.

use std::time::{Duration, Instant};

use sha2::Digest as _;

use super::synth::WorkPath;
use crate::nix::NarInfo;

/// GET every path's narinfo and NAR from the cache at `http`, one after another (each within
/// `timeout`), checking the NAR's size and sha256 against the narinfo. Returns the time spent,
/// NARs verified, errors.
pub async fn fetch_all(
    http: &str,
    work: &[WorkPath],
    timeout: Duration,
    progress: &indicatif::ProgressBar,
) -> (Duration, usize, Vec<String>) {
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => return (Duration::ZERO, 0, vec![format!("HTTP client: {e}")]),
    };
    let mut spent = Duration::ZERO;
    let mut ok = 0;
    let mut errors = Vec::new();
    for p in work {
        let t0 = Instant::now();
        match fetch_one(&client, http, p).await {
            Ok(()) => ok += 1,
            Err(e) => errors.push(format!("{}: {e:#}", p.path)),
        }
        spent += t0.elapsed();
        progress.inc(1);
    }
    (spent, ok, errors)
}

async fn fetch_one(client: &reqwest::Client, http: &str, p: &WorkPath) -> anyhow::Result<()> {
    let url = format!("http://{http}/{}.narinfo", p.path.hash_part());
    let r = client.get(&url).send().await?.error_for_status()?;
    let info = NarInfo::parse(&r.text().await?)?;
    anyhow::ensure!(
        info.compression == "none",
        "NAR compressed as {}",
        info.compression
    );
    let mut r = client
        .get(format!("http://{http}/{}", info.url))
        .send()
        .await?
        .error_for_status()?;
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await? {
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    anyhow::ensure!(
        n == info.nar_size,
        "NAR of {n} bytes, narinfo says {}",
        info.nar_size
    );
    anyhow::ensure!(
        h.finalize().as_slice() == info.nar_hash.0,
        "NAR does not match the narinfo's NarHash"
    );
    Ok(())
}
