//! Reading what the other end says first, against a deadline: the opening bytes that tell an original
//! end from a p2pchat one, then whole frames. The tracker and the peer's links both start this way, and
//! both then bound how long a connection may stay silent ([`Silence`]).

use std::io;
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant, Sleep};

use crate::protocol::MAGIC;
use crate::wire::frames::{classify_opening, Frame, FrameDecoder, FrameError, Opening};

/// What the first bytes of a connection said.
pub(crate) enum Opened {
    /// The p2pchat magic; the bytes that followed it.
    P2pchat(Vec<u8>),
    /// Bytes that are not the magic: an original end.
    Original,
    /// Nothing at all within the wait: an original end, which speaks only when its user types.
    Silent,
    /// The connection ended, failed, or stopped halfway through the magic.
    Closed(String),
}

/// Read until the first bytes tell the protocol, or `wait` passes, or the connection ends.
pub(crate) async fn read_opening<R: AsyncRead + Unpin>(reader: &mut R, wait: Duration) -> Opened {
    let mut first = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        match classify_opening(&first) {
            Opening::P2pchat => return Opened::P2pchat(first.split_off(MAGIC.len())),
            Opening::Original => return Opened::Original,
            Opening::Undecided => {}
        }
        first.reserve(MAGIC.len());
        match timeout_at(deadline, reader.read_buf(&mut first)).await {
            Err(_) if first.is_empty() => return Opened::Silent,
            Err(_) => return Opened::Closed("sent a partial p2pchat opening, then nothing".to_owned()),
            Ok(Ok(0)) => return Opened::Closed("closed by the other side".to_owned()),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Opened::Closed(format!("read failed: {err}")),
        }
    }
}

#[derive(Debug, Error)]
pub(crate) enum FrameReadError {
    #[error("closed before a whole frame arrived")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no whole frame in time")]
    TimedOut,
    #[error("{0}")]
    Bad(#[from] FrameError),
}

/// The next whole frame from `reader` (through `decoder`, which may already hold bytes) by `deadline`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
    deadline: Instant,
) -> Result<Frame, FrameReadError> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(frame);
        }
        buf.clear();
        match timeout_at(deadline, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err(FrameReadError::Closed),
            Ok(Ok(_)) => decoder.feed(&buf),
            Ok(Err(err)) => return Err(err.into()),
            Err(_) => return Err(FrameReadError::TimedOut),
        }
    }
}

/// How long a connection may stay silent (a peer's link, a tracker registration): a read only notes the
/// time, and the one timer behind it is moved when it goes off early, so a busy connection does not arm
/// a new timer for every read.
pub(crate) struct Silence {
    bound: Duration,
    heard: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Silence {
    pub(crate) fn new(bound: Duration) -> Self {
        Self { bound, heard: Instant::now(), timer: Box::pin(tokio::time::sleep(bound)) }
    }

    /// Something arrived.
    pub(crate) fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// Done once nothing arrived for `bound`.
    pub(crate) async fn passed(&mut self) {
        loop {
            (&mut self.timer).await;
            let deadline = self.heard + self.bound;
            if deadline <= Instant::now() {
                return;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}
