//! The CLI's side of the node's Unix socket: one request, one response.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::frame;

/// A connection to a running node.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "connecting to the node at {} (is `narmesh serve` running?)",
                socket.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client { stream })
    }

    /// Send one request and wait for its response; a refusal becomes an error.
    pub fn call(&mut self, request: Request) -> anyhow::Result<Response> {
        let env = Envelope {
            version: narmesh_proto::HOOK_PROTOCOL_VERSION,
            request,
        };
        frame::write_frame(&mut self.stream, &env).context("sending to the node")?;
        match frame::read_frame(&mut self.stream).context("reading the node's answer")? {
            Response::Error { message } => anyhow::bail!("the node refused: {message}"),
            other => Ok(other),
        }
    }
}
