//! Length-prefixed postcard frames (`narmesh_proto::frame`) on iroh QUIC streams.

use narmesh_proto::frame::{self, FrameError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A request (a hash and a few numbers, in every version) is at most this long: a server
/// refuses a longer one at its length prefix, before it holds any room for it.
pub const MAX_REQUEST: usize = 4096;

/// Read one frame from a stream.
pub async fn read<T: DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> Result<T, FrameError> {
    read_up_to(r, frame::MAX_FRAME).await
}

/// Read one request frame, at most [`MAX_REQUEST`] bytes, from a stream a peer opened.
pub async fn read_request<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    read_up_to(r, MAX_REQUEST).await
}

async fn read_up_to<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = frame::payload_len(prefix)?;
    if len > limit {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    frame::decode(&payload)
}

/// The stream broke off (reset, closed, or ended mid-frame) rather than carrying something
/// that is not a frame: not the peer's fault, so neither counted nor a reason to close its
/// connection.
pub fn broke_off(e: &FrameError) -> bool {
    matches!(e, FrameError::Io(_) | FrameError::Closed)
}

/// Write one frame to a stream.
pub async fn write<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = frame::encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use narmesh_proto::sync::{NarQuery, NarWhat};

    #[tokio::test]
    async fn a_request_is_refused_at_a_prefix_over_its_limit() {
        let q = NarQuery {
            version: 2,
            blake3: [7; 32],
            what: NarWhat::Range { start: 0, end: 1 },
        };
        let bytes = frame::encode(&q).unwrap();
        assert_eq!(read_request::<NarQuery>(&mut &bytes[..]).await.unwrap(), q);
        // A prefix alone, no payload: refused at once, not waited for.
        let long = ((MAX_REQUEST + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_request::<NarQuery>(&mut &long[..]).await,
            Err(FrameError::TooLarge(n)) if n == MAX_REQUEST + 1
        ));
        // Answers may be longer (up to a frame).
        let mut answer = long.to_vec();
        answer.resize(4 + MAX_REQUEST + 1, 0);
        assert!(!matches!(
            read::<Vec<u8>>(&mut &answer[..]).await,
            Err(FrameError::TooLarge(_))
        ));
    }
}
