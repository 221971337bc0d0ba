//! The CLI's side of the node's Unix socket: one request, one response.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use narmesh_proto::control::{Envelope, Request, Response};
use narmesh_proto::frame;

/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(10);
/// How long sending a request, or waiting for each read of its answer, may take.
const ANSWER: Duration = Duration::from_secs(120);

/// A connection to a running node.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connect within [`CONNECT`]: `connect(2)` on a Unix socket blocks while the node's
    /// listen backlog is full (a frozen node), so it runs on a thread of its own that is left
    /// behind if it does not return in time (the CLI exits soon after).
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = socket.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        });
        let stream = match rx.recv_timeout(CONNECT) {
            Ok(r) => r.with_context(|| {
                format!(
                    "connecting to the node at {} (is `narmesh serve` running?)",
                    socket.display()
                )
            })?,
            Err(_) => anyhow::bail!(
                "the node at {} did not accept a connection within {CONNECT:?} (is it frozen?)",
                socket.display()
            ),
        };
        stream.set_read_timeout(Some(ANSWER))?;
        stream.set_write_timeout(Some(ANSWER))?;
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
