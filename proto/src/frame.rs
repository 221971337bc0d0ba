//! Frames on the node's Unix socket: a 4-byte little-endian length, then that many bytes of
//! postcard. Std-only, so the hook can use it without a runtime.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side accepts (a report of a few thousand paths fits easily).
pub const MAX_FRAME: usize = 1 << 20;

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("frame is empty")]
    Empty,
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encode `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    postcard::to_io(msg, &mut out).map_err(FrameError::Decode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decode a frame's payload (without the length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    Ok(postcard::from_bytes(payload)?)
}

/// Check a length prefix.
pub fn payload_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    match len {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME => Err(FrameError::TooLarge(n)),
        n => Ok(n),
    }
}

/// Write one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Read one frame; `Closed` if the peer closed before sending anything.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = payload_len(prefix)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Envelope, Request, Response};
    use crate::hook::HookReport;
    use proptest::prelude::*;

    #[test]
    fn round_trip_over_a_stream() {
        let env = Envelope {
            version: crate::HOOK_PROTOCOL_VERSION,
            request: Request::Hook(HookReport::from_env_values(
                Some("/nix/store/x.drv"),
                Some(" a  b "),
            )),
        };
        let bytes = encode(&env).unwrap();
        let back: Envelope = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(back, env);
        if let Request::Hook(h) = back.request {
            assert_eq!(h.out_paths, vec!["a", "b"]);
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(payload_len([0, 0, 0, 0]), Err(FrameError::Empty)));
        assert!(matches!(
            payload_len([0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame::<Envelope>(&mut &[][..]),
            Err(FrameError::Closed)
        ));
        assert!(read_frame::<Envelope>(&mut &[5, 0, 0, 0, 1][..]).is_err());
        assert!(read_frame::<Envelope>(&mut &[2, 0, 0, 0, 0xff, 0xff][..]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_frame::<Envelope>(&mut &bytes[..]);
            let _ = decode::<Envelope>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        #[test]
        fn requests_round_trip(paths in proptest::collection::vec("\\PC{0,40}", 0..8), drv in proptest::option::of("\\PC{0,40}")) {
            for request in [
                Request::Push { paths: paths.clone() },
                Request::Lookup { paths: paths.clone() },
                Request::Hook(HookReport { drv_path: drv.clone(), out_paths: paths.clone() }),
                Request::Status,
            ] {
                let env = Envelope { version: 1, request };
                let bytes = encode(&env).unwrap();
                prop_assert_eq!(read_frame::<Envelope>(&mut &bytes[..]).unwrap(), env);
            }
        }
    }
}
