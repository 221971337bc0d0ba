//! `.narinfo` files: rendered in Nix's field order and parsed strictly (required fields, one
//! `References`, repeated `Sig`, unknown keys ignored, a clear error for anything malformed).
//! Also the signing fingerprint `1;path;narHash;narSize;refs`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::hash::Sha256;
use super::keys::{SecretKey, Signature, TrustedKeys};
use super::store_path::StorePath;

/// Largest narinfo accepted from anyone (huge closures stay far below this).
pub const MAX_NARINFO_LEN: usize = 1 << 20;

/// Why a narinfo was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("narinfo is larger than {MAX_NARINFO_LEN} bytes")]
    TooLarge,
    #[error("narinfo line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("narinfo: missing required field {0}")]
    Missing(&'static str),
    #[error("narinfo: field {0} appears twice")]
    Duplicate(&'static str),
}

/// A parsed or to-be-rendered narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative URL of the NAR file.
    pub url: String,
    /// `none`, `xz`, `zstd`, ...; an absent line means `bzip2`, as in Nix.
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

impl NarInfo {
    /// The string Nix signs: `1;<path>;<narHash>;<narSize>;<sorted full refs, comma-joined>`.
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Add a signature by `key`, replacing an older one by the same key name.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(&self.fingerprint());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
    }

    /// True if a trusted key signed this narinfo's fingerprint.
    pub fn is_trusted(&self, keys: &TrustedKeys) -> bool {
        keys.verifies(&self.fingerprint(), &self.sigs)
    }

    /// Render in Nix's own field order.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(512 + 64 * self.references.len());
        // Writing into a String cannot fail.
        let _ = write!(
            s,
            "StorePath: {}\nURL: {}\nCompression: {}\n",
            self.store_path, self.url, self.compression
        );
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = write!(
            s,
            "NarHash: {}\nNarSize: {}\nReferences:",
            self.nar_hash, self.nar_size
        );
        s.push(' ');
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        s.push_str(&refs.join(" "));
        s.push('\n');
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        let mut sigs: Vec<String> = self.sigs.iter().map(|s| s.to_string()).collect();
        sigs.sort();
        sigs.dedup();
        for sig in sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// Parse strictly; see the module docs.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_LEN {
            return Err(NarInfoError::TooLarge);
        }
        let mut b = Builder::default();
        let mut rest = text;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let err = |why: String| NarInfoError::Line { line: line_no, why };
            let (line, tail) = rest
                .split_once('\n')
                .ok_or_else(|| err("not terminated by a newline".into()))?;
            rest = tail;
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| err(format!("expected 'Key: value', got {line:?}")))?;
            b.field(key, value).map_err(|e| match e {
                FieldError::Bad(why) => err(format!("{key}: {why}")),
                FieldError::Dup(k) => NarInfoError::Duplicate(k),
            })?;
        }
        b.finish()
    }
}

/// A binary cache's `nix-cache-info`, as Nix reads it before anything else.
pub fn cache_info(priority: u32) -> String {
    format!("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n")
}

/// The fingerprint of a path's metadata (see [`NarInfo::fingerprint`]).
pub fn fingerprint<'a>(
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> String {
    let mut refs: Vec<String> = references.into_iter().map(|r| r.full()).collect();
    refs.sort();
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

enum FieldError {
    Bad(String),
    Dup(&'static str),
}

#[derive(Default)]
struct Builder {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256>,
    nar_size: Option<u64>,
    references: Option<BTreeSet<StorePath>>,
    deriver: Option<Option<StorePath>>,
    sigs: Vec<Signature>,
    ca: Option<String>,
}

fn set<T>(
    slot: &mut Option<T>,
    name: &'static str,
    v: Result<T, String>,
) -> Result<(), FieldError> {
    if slot.is_some() {
        return Err(FieldError::Dup(name));
    }
    *slot = Some(v.map_err(FieldError::Bad)?);
    Ok(())
}

fn number(v: &str) -> Result<u64, String> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("{v:?} is not a number"));
    }
    v.parse().map_err(|_| format!("{v:?} is out of range"))
}

impl Builder {
    fn field(&mut self, key: &str, v: &str) -> Result<(), FieldError> {
        let e = |x: &dyn std::fmt::Display| x.to_string();
        match key {
            "StorePath" => set(
                &mut self.store_path,
                "StorePath",
                StorePath::parse(v).map_err(|x| e(&x)),
            ),
            "URL" => set(&mut self.url, "URL", non_empty_token(v)),
            "Compression" => set(&mut self.compression, "Compression", non_empty_token(v)),
            "FileHash" => set(
                &mut self.file_hash,
                "FileHash",
                v.parse().map_err(|x| e(&x)),
            ),
            "FileSize" => set(&mut self.file_size, "FileSize", number(v)),
            "NarHash" => set(&mut self.nar_hash, "NarHash", v.parse().map_err(|x| e(&x))),
            "NarSize" => set(&mut self.nar_size, "NarSize", number(v)),
            "References" => set(&mut self.references, "References", refs(v)),
            "Deriver" => set(&mut self.deriver, "Deriver", deriver(v)),
            "Sig" => {
                self.sigs
                    .push(v.parse().map_err(|x| FieldError::Bad(e(&x)))?);
                Ok(())
            }
            "CA" => set(&mut self.ca, "CA", non_empty_token(v)),
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        let nar_size = self.nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::Missing("NarSize (must be > 0)"));
        }
        let mut sigs = self.sigs;
        sigs.dedup();
        Ok(NarInfo {
            store_path: self.store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: self.url.ok_or(NarInfoError::Missing("URL"))?,
            compression: self.compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver.flatten(),
            sigs,
            ca: self.ca,
        })
    }
}

fn non_empty_token(v: &str) -> Result<String, String> {
    if v.is_empty() || v.chars().any(|c| c.is_control()) {
        Err(format!("{v:?} is empty or has control characters"))
    } else {
        Ok(v.to_owned())
    }
}

fn refs(v: &str) -> Result<BTreeSet<StorePath>, String> {
    v.split(' ')
        .filter(|s| !s.is_empty())
        .map(|r| StorePath::from_base_name(r).map_err(|e| e.to_string()))
        .collect()
}

fn deriver(v: &str) -> Result<Option<StorePath>, String> {
    if v == "unknown-deriver" {
        return Ok(None);
    }
    StorePath::from_base_name(v)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[path = "narinfo_tests.rs"]
mod tests;
