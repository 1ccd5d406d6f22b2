//! Links in a private room: a Noise handshake, then encrypted records.
//!
//! The dialler opens with the magic and a `secure_hello` (the protocol version and the room's opaque
//! id, nothing else), then the first handshake message; the acceptor answers with the magic and its
//! own `secure_hello` (or an `error` frame), and the handshake runs to its end:
//! `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s`, with the room key as the pre-shared key, so only holders
//! of the key complete it, and fresh ephemeral keys give forward secrecy. The acceptor then sends an
//! empty record, so the dialler learns the handshake succeeded (with a different key the acceptor
//! closes instead).
//!
//! After it, both directions are records: a 2-byte big-endian length and a Noise transport message
//! (at most 65,535 bytes). Their plaintext is exactly what a plain link carries (the magic, a
//! `hello` with the name, frames), so everything above this module works unchanged on a
//! [`DuplexStream`]: two pump tasks encrypt and decrypt between it and the socket.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use snow::StatelessTransportState;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::private::RoomKey;
use crate::protocol::PROTOCOL_VERSION;
use crate::reading::{read_frame, read_opening, FrameReadError, Opened};
use crate::wire::frames::{self, Frame, FrameDecoder, ERR_ROOM, ERR_VERSION};

const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// The largest Noise message, and the room its authentication tag takes.
const MAX_RECORD: usize = 65_535;
const TAG_LEN: usize = 16;
/// Plaintext buffered between a link and its pumps, each way.
const PLAINTEXT_BUFFER: usize = 64 * 1024;

#[derive(Debug, Error)]
pub(super) enum HandshakeError {
    #[error("it does not open as a p2pchat peer in a private room")]
    NotPrivate,
    #[error("it refused the link: {0}")]
    Refused(String),
    #[error("it is in another room (or uses another secret for this one)")]
    OtherRoom,
    #[error("the handshake failed: it does not hold this room's key ({0})")]
    WrongKey(snow::Error),
    #[error("it closed the link during the handshake: it does not hold this room's key, or left")]
    ClosedDuringHandshake,
    #[error("the handshake took longer than {0:?}")]
    TimedOut(Duration),
    #[error("a broken handshake message ({0})")]
    Broken(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl HandshakeError {
    /// Whether the other end reached the room but lacks its key: worth telling the user (someone
    /// who knows the room's id, like the tracker, tried to get in; or a member typed the wrong secret).
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, Self::WrongKey(_) | Self::ClosedDuringHandshake)
    }
}

impl From<FrameReadError> for HandshakeError {
    fn from(err: FrameReadError) -> Self {
        match err {
            FrameReadError::Closed => Self::ClosedDuringHandshake,
            FrameReadError::TimedOut => Self::Broken("no whole frame in time".to_owned()),
            FrameReadError::Io(err) => Self::Io(err),
            FrameReadError::Bad(err) => Self::Broken(err.to_string()),
        }
    }
}

/// The plaintext side of a link whose handshake finished.
pub(super) type SecureStream = DuplexStream;

/// A finished handshake: the link, and its handshake hash (the same at both ends, different for every
/// link), to which each end binds its identity proof.
pub(super) struct Secured {
    pub stream: SecureStream,
    pub binding: Vec<u8>,
}

/// Our side of a link we dialled: handshake as the initiator, then start the pumps.
pub(super) async fn dial_side(
    stream: TcpStream,
    key: &RoomKey,
    wait: Duration,
    dead_after: Duration,
) -> Result<Secured, HandshakeError> {
    with_deadline(wait, initiate(stream, key, dead_after)).await
}

/// Our side of a link we accepted: handshake as the responder, then start the pumps.
pub(super) async fn accept_side(
    stream: TcpStream,
    key: &RoomKey,
    wait: Duration,
    dead_after: Duration,
) -> Result<Secured, HandshakeError> {
    with_deadline(wait, respond(stream, key, wait, dead_after)).await
}

async fn with_deadline(
    wait: Duration,
    work: impl std::future::Future<Output = Result<Secured, HandshakeError>>,
) -> Result<Secured, HandshakeError> {
    tokio::time::timeout(wait, work).await.unwrap_or(Err(HandshakeError::TimedOut(wait)))
}

/// The handshake's state: the room key as the pre-shared key, and a fresh static key per link (who
/// a member is comes from its signed identity, not from this key).
fn noise_state(key: &RoomKey, initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
    noise_state_for(key, &prologue(PROTOCOL_VERSION, &key.room_id()), initiator)
}

/// What both ends' handshakes commit to before any key is mixed in: the protocol version and the
/// room's id, which the `secure_hello`s carry in clear. An end that saw them altered on the way
/// (a downgrade, another room) cannot complete the handshake.
fn prologue(version: u32, room_id: &str) -> Vec<u8> {
    let mut prologue = b"p2pchat private link v1\0".to_vec();
    prologue.extend_from_slice(&version.to_be_bytes());
    prologue.extend_from_slice(room_id.as_bytes());
    prologue
}

fn noise_state_for(key: &RoomKey, prologue: &[u8], initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
    let builder = snow::Builder::new(NOISE_PARAMS.parse()?);
    let keypair = builder.generate_keypair()?;
    let builder = builder.local_private_key(&keypair.private)?.psk(3, key.key())?.prologue(prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

async fn initiate(mut stream: TcpStream, key: &RoomKey, dead_after: Duration) -> Result<Secured, HandshakeError> {
    let mut noise = noise_state(key, true).map_err(HandshakeError::WrongKey)?;
    let mut opening = frames::encode_opening(&Frame::SecureHello { v: PROTOCOL_VERSION, room: key.room_id() });
    let mut message = vec![0u8; MAX_RECORD];
    let n = noise.write_message(&[], &mut message).map_err(HandshakeError::WrongKey)?;
    push_record(&mut opening, &message[..n]);
    stream.write_all(&opening).await?;

    let mut pending = match read_opening(&mut stream, dead_after).await {
        Opened::P2pchat(rest) => rest,
        Opened::Closed(_) => return Err(HandshakeError::ClosedDuringHandshake),
        Opened::Original | Opened::Silent => return Err(HandshakeError::NotPrivate),
    };
    let mut decoder = FrameDecoder::new();
    decoder.feed(&pending);
    match read_frame(&mut stream, &mut decoder, Instant::now() + dead_after).await? {
        Frame::SecureHello { room, .. } if room == key.room_id() => {}
        Frame::SecureHello { .. } => return Err(HandshakeError::OtherRoom),
        Frame::Error { message, .. } => return Err(HandshakeError::Refused(message)),
        _ => return Err(HandshakeError::NotPrivate),
    }
    pending = decoder.take_rest();
    let reply = read_record(&mut stream, &mut pending).await?;
    noise.read_message(&reply, &mut message).map_err(HandshakeError::WrongKey)?;
    let n = noise.write_message(&[], &mut message).map_err(HandshakeError::WrongKey)?;
    let mut last = Vec::new();
    push_record(&mut last, &message[..n]);
    stream.write_all(&last).await?;
    let binding = noise.get_handshake_hash().to_vec();
    let transport = noise.into_stateless_transport_mode().map_err(HandshakeError::WrongKey)?;
    // The acceptor's empty record says it took our last message (so it holds the key).
    let ready = read_record(&mut stream, &mut pending).await?;
    transport.read_message(0, &ready, &mut message).map_err(HandshakeError::WrongKey)?;
    Ok(Secured { stream: start_pumps(stream, transport, Nonces { send: 0, receive: 1 }, pending, dead_after), binding })
}

async fn respond(
    mut stream: TcpStream,
    key: &RoomKey,
    wait: Duration,
    dead_after: Duration,
) -> Result<Secured, HandshakeError> {
    let rest = match read_opening(&mut stream, wait).await {
        Opened::P2pchat(rest) => rest,
        Opened::Closed(_) => return Err(HandshakeError::ClosedDuringHandshake),
        Opened::Original | Opened::Silent => return Err(HandshakeError::NotPrivate),
    };
    let mut decoder = FrameDecoder::new();
    decoder.feed(&rest);
    let refusal = match read_frame(&mut stream, &mut decoder, Instant::now() + wait).await? {
        Frame::SecureHello { v, .. } if v != PROTOCOL_VERSION => Some((
            ERR_VERSION,
            format!("this peer speaks p2pchat protocol version {PROTOCOL_VERSION}"),
            HandshakeError::NotPrivate,
        )),
        Frame::SecureHello { room, .. } if room == key.room_id() => None,
        Frame::SecureHello { .. } => Some((
            ERR_ROOM,
            "this peer is in another room, or has another secret for it".to_owned(),
            HandshakeError::OtherRoom,
        )),
        _ => Some((
            ERR_ROOM,
            "this peer is in a private room; it takes encrypted links only".to_owned(),
            HandshakeError::NotPrivate,
        )),
    };
    if let Some((code, message, err)) = refusal {
        let _ = stream.write_all(&frames::encode_opening(&Frame::Error { code: code.to_owned(), message })).await;
        return Err(err);
    }
    let mut pending = decoder.take_rest();
    let mut noise = noise_state(key, false).map_err(HandshakeError::WrongKey)?;
    let mut message = vec![0u8; MAX_RECORD];
    let first = read_record(&mut stream, &mut pending).await?;
    noise.read_message(&first, &mut message).map_err(HandshakeError::WrongKey)?;
    let mut reply = frames::encode_opening(&Frame::SecureHello { v: PROTOCOL_VERSION, room: key.room_id() });
    let n = noise.write_message(&[], &mut message).map_err(HandshakeError::WrongKey)?;
    push_record(&mut reply, &message[..n]);
    stream.write_all(&reply).await?;
    let last = read_record(&mut stream, &mut pending).await?;
    // With another key, this is where it fails (the pre-shared key is mixed in last).
    noise.read_message(&last, &mut message).map_err(HandshakeError::WrongKey)?;
    let binding = noise.get_handshake_hash().to_vec();
    let transport = noise.into_stateless_transport_mode().map_err(HandshakeError::WrongKey)?;
    let n = transport.write_message(0, &[], &mut message).map_err(HandshakeError::WrongKey)?;
    let mut ready = Vec::new();
    push_record(&mut ready, &message[..n]);
    stream.write_all(&ready).await?;
    Ok(Secured { stream: start_pumps(stream, transport, Nonces { send: 1, receive: 0 }, pending, dead_after), binding })
}

fn push_record(out: &mut Vec<u8>, message: &[u8]) {
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// The next record (after what is already in `pending`, which keeps what follows it).
async fn read_record<R: AsyncRead + Unpin>(reader: &mut R, pending: &mut Vec<u8>) -> Result<Vec<u8>, HandshakeError> {
    loop {
        if pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() >= 2 + len {
                let record = pending[2..2 + len].to_vec();
                pending.drain(..2 + len);
                return Ok(record);
            }
        }
        pending.reserve(4096);
        if reader.read_buf(pending).await? == 0 {
            return Err(HandshakeError::ClosedDuringHandshake);
        }
    }
}

/// The next nonce each way (each direction counts its records from 0).
struct Nonces {
    send: u64,
    receive: u64,
}

fn start_pumps(
    stream: TcpStream,
    transport: StatelessTransportState,
    nonces: Nonces,
    pending: Vec<u8>,
    dead_after: Duration,
) -> SecureStream {
    let _ = stream.set_nodelay(true);
    crate::net::detect_dead_peer(&stream, dead_after);
    let (ours, theirs) = tokio::io::duplex(PLAINTEXT_BUFFER);
    let (plain_read, plain_write) = tokio::io::split(theirs);
    let (tcp_read, tcp_write) = stream.into_split();
    let transport = Arc::new(transport);
    tokio::spawn(decrypt_pump(tcp_read, plain_write, transport.clone(), nonces.receive, pending));
    tokio::spawn(encrypt_pump(plain_read, tcp_write, transport, nonces.send));
    ours
}

/// Socket → records → plaintext for the link. Ends (closing the plaintext side, which the link's
/// reader sees as the end) when the socket ends or a record fails to decrypt.
async fn decrypt_pump(
    mut tcp: OwnedReadHalf,
    mut plain: WriteHalf<DuplexStream>,
    transport: Arc<StatelessTransportState>,
    mut nonce: u64,
    mut pending: Vec<u8>,
) {
    let mut plaintext = vec![0u8; MAX_RECORD];
    loop {
        let Ok(record) = read_record(&mut tcp, &mut pending).await else { break };
        let Ok(n) = transport.read_message(nonce, &record, &mut plaintext) else {
            log::warn!("a record on a private link failed to decrypt (altered or replayed); closing the link");
            break;
        };
        nonce += 1;
        if plain.write_all(&plaintext[..n]).await.is_err() {
            break;
        }
    }
    let _ = plain.shutdown().await;
}

/// Plaintext from the link → records → socket. Ends when the link closes its side (then the socket
/// is shut for writing) or the socket fails (then its reads are stopped too, so the link ends).
async fn encrypt_pump(
    mut plain: ReadHalf<DuplexStream>,
    mut tcp: OwnedWriteHalf,
    transport: Arc<StatelessTransportState>,
    mut nonce: u64,
) {
    let mut chunk = vec![0u8; MAX_RECORD - TAG_LEN];
    let mut record = vec![0u8; MAX_RECORD + 2];
    loop {
        let n = match plain.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(len) = transport.write_message(nonce, &chunk[..n], &mut record[2..]) else { break };
        nonce += 1;
        record[..2].copy_from_slice(&(len as u16).to_be_bytes());
        if tcp.write_all(&record[..2 + len]).await.is_err() {
            let _ = socket2::SockRef::from(tcp.as_ref()).shutdown(std::net::Shutdown::Read);
            return;
        }
    }
    let _ = tcp.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the three handshake messages between two states; whether both ends complete.
    fn completes(mut initiator: snow::HandshakeState, mut responder: snow::HandshakeState) -> bool {
        let (mut message, mut read) = (vec![0u8; MAX_RECORD], vec![0u8; MAX_RECORD]);
        let mut steps = || -> Result<(), snow::Error> {
            let n = initiator.write_message(&[], &mut message)?;
            responder.read_message(&message[..n], &mut read)?;
            let n = responder.write_message(&[], &mut message)?;
            initiator.read_message(&message[..n], &mut read)?;
            let n = initiator.write_message(&[], &mut message)?;
            responder.read_message(&message[..n], &mut read)?;
            Ok(())
        };
        steps().is_ok()
    }

    #[test]
    fn the_handshake_commits_to_the_protocol_version_and_the_room() {
        let key = RoomKey::from_secret("", &format!("p2pc1-{}-{}", "22".repeat(32), hex::encode(b"plans"))).unwrap();
        let state =
            |version: u32, room: &str, initiator| noise_state_for(&key, &prologue(version, room), initiator).unwrap();
        let id = key.room_id();
        assert!(completes(state(PROTOCOL_VERSION, &id, true), state(PROTOCOL_VERSION, &id, false)));
        assert!(
            !completes(state(PROTOCOL_VERSION, &id, true), state(PROTOCOL_VERSION + 1, &id, false)),
            "a version altered on the way"
        );
        assert!(
            !completes(state(PROTOCOL_VERSION, &id, true), state(PROTOCOL_VERSION, "another room", false)),
            "a room altered"
        );
    }
}
