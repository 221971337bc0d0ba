//! Length-prefixed postcard frames (`narmesh_proto::frame`) on iroh QUIC streams.

use narmesh_proto::frame::{self, FrameError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read one frame from a stream.
pub async fn read<T: DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = frame::payload_len(prefix)?;
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
