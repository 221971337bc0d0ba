//! How an executable starts: statically linked, through the dynamic loader, or as a script. The
//! hook runs once per build, and on a busy host starting the process is about half of a call:
//! in the default `narmesh bench` burst a dynamically linked hook's start alone took p99 4.4 ms
//! (median of 19 runs), a statically linked one's 2.2 ms (BENCHMARKS.md). `narmesh doctor` and
//! `narmesh bench` say which one they see. Reads the first bytes and the ELF program headers;
//! never trusts them (any file gives an answer, never a panic).

use std::io::Read as _;
use std::path::Path;

/// What starts when the file is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linkage {
    /// An ELF file with no program interpreter: the kernel starts it directly.
    Static,
    /// An ELF file with a program interpreter (`ld.so`), which loads its libraries first.
    Dynamic,
    /// A `#!` script: its interpreter starts first.
    Script,
    /// Anything else (not an ELF executable, truncated, or a byte order or class we do not read).
    Unknown,
}

impl std::fmt::Display for Linkage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Linkage::Static => "statically linked",
            Linkage::Dynamic => "dynamically linked",
            Linkage::Script => "a script",
            Linkage::Unknown => "of unknown kind",
        })
    }
}

/// The program headers read at most (real executables have about a dozen).
const MAX_HEADERS: usize = 256;
/// Size of an ELF64 program header.
const PHENT: usize = 56;
/// ELF file types that run: an executable, a position-independent one.
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
/// ELF program header types: a loaded segment, the interpreter's path.
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;

/// The linkage of the file at `path` (following symlinks).
pub fn of_file(path: &Path) -> std::io::Result<Linkage> {
    let mut f = std::fs::File::open(path)?;
    let mut head = Vec::new();
    // ELF64 header (64 bytes) and program headers (56 bytes each) sit at the start in practice;
    // 64 KiB holds them in every executable we build. Headers further in read as Unknown.
    f.by_ref().take(64 << 10).read_to_end(&mut head)?;
    Ok(of_bytes(&head))
}

/// The linkage of an executable from its first bytes.
pub fn of_bytes(b: &[u8]) -> Linkage {
    if b.starts_with(b"#!") {
        return Linkage::Script;
    }
    // 64-bit little-endian ELF only (x86_64 and aarch64 Linux).
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Linkage::Unknown;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let Ok(phoff) = usize::try_from(u64::from_le_bytes(b[0x20..0x28].try_into().unwrap())) else {
        return Linkage::Unknown;
    };
    let (etype, entsize, count) = (u16_at(0x10) as u16, u16_at(0x36), u16_at(0x38));
    if !matches!(etype, ET_EXEC | ET_DYN) || entsize != PHENT || count == 0 || count > MAX_HEADERS {
        return Linkage::Unknown;
    }
    let (mut loads, mut interp) = (false, false);
    for i in 0..count {
        let Some(at) = i.checked_mul(entsize).and_then(|o| o.checked_add(phoff)) else {
            return Linkage::Unknown;
        };
        let Some(t) = at.checked_add(4).and_then(|end| b.get(at..end)) else {
            return Linkage::Unknown;
        };
        match u32::from_le_bytes(t.try_into().unwrap()) {
            PT_LOAD => loads = true,
            PT_INTERP => interp = true,
            _ => {}
        }
    }
    match (loads, interp) {
        (false, _) => Linkage::Unknown,
        (true, true) => Linkage::Dynamic,
        (true, false) => Linkage::Static,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF64 executable's header with program headers of these types right after it.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x10..0x12].copy_from_slice(&ET_DYN.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn an_interpreter_header_is_dynamic_and_none_is_static() {
        assert_eq!(of_bytes(&elf(&[6, PT_INTERP, 1, 1])), Linkage::Dynamic);
        assert_eq!(of_bytes(&elf(&[6, 1, 1, 2])), Linkage::Static);
        // Not something that runs: no segment to load, no header, an object file.
        assert_eq!(of_bytes(&elf(&[6, 2])), Linkage::Unknown);
        assert_eq!(of_bytes(&elf(&[])), Linkage::Unknown);
        let mut object = elf(&[1]);
        object[0x10] = 1;
        assert_eq!(of_bytes(&object), Linkage::Unknown);
        assert_eq!(of_bytes(b"#!/bin/sh\nexec narmesh-hook\n"), Linkage::Script);
        assert_eq!(of_bytes(b"\x7fELF"), Linkage::Unknown);
        // Program headers said to lie beyond the bytes read.
        let mut cut = elf(&[1, PT_INTERP]);
        cut.truncate(64 + 56);
        assert_eq!(of_bytes(&cut), Linkage::Unknown);
    }

    #[test]
    fn this_test_binary_is_read_as_cargo_linked_it() {
        // Cargo links test binaries dynamically on the gnu targets we build for.
        let me = std::env::current_exe().unwrap();
        assert_eq!(of_file(&me).unwrap(), Linkage::Dynamic);
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = of_bytes(&b);
        }

        #[test]
        fn any_header_fields_give_an_answer(
            phoff in any::<u64>(), entsize in any::<u16>(), count in any::<u16>(),
            tail in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut b = elf(&[1]);
            b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
            b[0x36..0x38].copy_from_slice(&entsize.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
            b.extend(tail);
            let _ = of_bytes(&b);
        }
    }
}
