//! The socket options p2pchat depends on, behind small functions so platform differences live here only.
//!
//! * **Shared port.** A peer listens on port P and talks to the tracker *from* P, so the address the
//!   tracker records is the one others can dial (also through a port-preserving NAT). The listener must
//!   exist before the tracker can hand out P, so both sockets are bound to P at once: that takes
//!   `SO_REUSEADDR` plus, on Unix, `SO_REUSEPORT` on every socket bound to P. Windows has no
//!   `SO_REUSEPORT`; there `SO_REUSEADDR` alone lets the second bind succeed.
//! * **Leaving nothing behind on the other side** ([`write_and_end`]). The tracker must end an original
//!   client's exchange so that the client's socket is gone by the time it binds P again, microseconds
//!   after it read the list (`EADDRINUSE` otherwise). See the function for how.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A TCP socket bound to `local` that can share its port with our other sockets bound the same way.
pub fn shared_port_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))))]
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// Listen on `local` with a shareable port (see the module docs).
pub fn listen_shared(local: SocketAddr) -> io::Result<TcpListener> {
    shared_port_socket(local)?.listen(1024)
}

/// Connect to `remote` from the shareable `local` address.
pub async fn connect_from(local: SocketAddr, remote: SocketAddr) -> io::Result<TcpStream> {
    shared_port_socket(local)?.connect(remote).await
}

/// Write `bytes` as the last thing said on `stream`, and close it so that nothing of the connection
/// survives on the other side, whichever side's kernel runs first.
///
/// The bytes and our FIN leave in one segment (the socket is corked while they are queued), so the
/// reader sees the data and the end of the stream at the same moment. Then what frees its socket
/// depends on where it is:
/// - **On this host**, the other side's next segment (the ACK of our FIN, or its own FIN when it
///   closes) is answered by a reset from our kernel, inside that side's own syscall: the socket is
///   closed as it is (the close sends the FIN) and told not to wait in `FIN_WAIT2` (`TCP_LINGER2` < 0).
///   Nothing of ours runs between the FIN and that reset, so it cannot lose a race to a reader that
///   wakes up at the FIN and closes and binds before we are scheduled again.
/// - **Across a network**, that reset would come a round trip after the other side's close, so we
///   reset (`SO_LINGER` 0) right behind the FIN, which arrives before the reader has acted on it. Linux
///   keeps data already received readable after a reset. A reset discards unsent bytes, so it waits
///   until the send queue is empty (bounded by `max_wait`).
pub async fn write_and_end(stream: TcpStream, bytes: &[u8], max_wait: Duration) -> io::Result<()> {
    let same_host = match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => {
            let (local, peer) = (canonical(local).ip(), canonical(peer).ip());
            peer.is_loopback() || peer == local
        }
        _ => false,
    };
    // Without TCP_LINGER2, a reset right behind the FIN is the next best thing on this host too.
    let ending =
        if same_host && reset_after_fin(&stream) { Ending::KernelResets } else { Ending::ResetBehind(max_wait) };
    end_with(stream, bytes, ending).await
}

/// How [`write_and_end`] frees the other side's socket.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Close now; the kernel answers the other side's next segment with a reset ([`reset_after_fin`]
    /// was set).
    KernelResets,
    /// Reset right behind the FIN, once the send queue is empty or this long has passed.
    ResetBehind(Duration),
}

async fn end_with(mut stream: TcpStream, bytes: &[u8], ending: Ending) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let socket = socket2::SockRef::from(&stream);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = socket.set_tcp_cork(true) {
        log::debug!("could not cork the socket, data and FIN may leave apart: {err}");
    }
    if let Ending::ResetBehind(_) = ending {
        reset_on_close(&stream);
    }
    stream.write_all(bytes).await?;
    // Leave tokio's reactor first, so that between the FIN leaving and a reset of ours there is nothing
    // but a counter read: the reader wakes up at the FIN and may run before we do anything else.
    let stream = stream.into_std()?;
    let Ending::ResetBehind(max_wait) = ending else {
        drop(stream); // sends the corked bytes and the FIN
        return Ok(());
    };
    stream.shutdown(std::net::Shutdown::Write)?;
    if unsent_bytes(&stream) > 0 {
        // Rare (the kernel held the segment back): a reset would discard it, so let it leave first.
        let deadline = std::time::Instant::now() + max_wait;
        while unsent_bytes(&stream) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    drop(stream);
    Ok(())
}

/// Have the kernel reset the connection once our FIN is acknowledged after we closed (instead of
/// waiting in `FIN_WAIT2`), and answer any later segment with a reset. False where that cannot be set.
#[cfg(target_os = "linux")]
fn reset_after_fin(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let negative: libc::c_int = -1;
    // TCP_LINGER2 < 0: a closed socket goes from FIN_WAIT1 straight to CLOSED, with a reset, when its FIN
    // is acknowledged. Sets an option on our own socket; cannot harm anything else.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_LINGER2,
            std::ptr::addr_of!(negative).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!("could not set TCP_LINGER2: {}", io::Error::last_os_error());
    }
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn reset_after_fin(_stream: &TcpStream) -> bool {
    false
}

/// Make the next close of `stream` a reset.
fn reset_on_close(stream: &TcpStream) {
    if let Err(err) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        log::debug!("could not set SO_LINGER 0, the close will be normal: {err}");
    }
}

/// Close with a reset right away, leaving no `TIME_WAIT` behind (used where nothing is left to send).
pub fn reset(stream: TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// Bytes written to `stream` that the kernel has not transmitted yet (they may be unacknowledged).
#[cfg(target_os = "linux")]
fn unsent_bytes(stream: &std::net::TcpStream) -> i64 {
    use std::os::fd::AsRawFd;
    let mut unsent: libc::c_int = 0;
    // SIOCOUTQNSD: bytes in the send queue not yet sent. Reads a counter; cannot harm the socket.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::SIOCOUTQNSD as _, &mut unsent) };
    if rc == 0 {
        i64::from(unsent)
    } else {
        0
    }
}

/// Other systems give no portable count of unsent bytes; assume a small write has left.
#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_stream: &std::net::TcpStream) -> i64 {
    0
}

/// Let the kernel notice a peer that vanished without a FIN or a reset (crash, cable, firewall): TCP
/// keep-alive probes while the link is idle, and (Linux) a bound on how long written data may stay
/// unacknowledged: gone within about `after`. Used on every link, and the only watch on a quiet
/// member's link or registration (nobody pings those; original links cannot be pinged at all).
pub fn detect_dead_peer(stream: &TcpStream, after: Duration) {
    let socket = socket2::SockRef::from(stream);
    // The kernel takes whole seconds, and refuses 0 (EINVAL: no keep-alive at all).
    let seconds = |d: Duration| d.max(Duration::from_secs(1));
    // Idle links are probed every quarter of `after` (2 s for a member's 8 s), not every half: the
    // kernel's timer wheel (HZ=250) fires a timer 4 s ahead in 256 ms batches but one 2 s ahead in
    // 32 ms ones. One host holding a room of 200 (39,800 quiet sockets) lost 114,279 packets in 30 s
    // to bursts of probes overflowing loopback's input backlog, and links died of it.
    let probes = socket2::TcpKeepalive::new().with_time(seconds(after / 4)).with_interval(seconds(after / 8));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios"))]
    let probes = probes.with_retries(4);
    if let Err(err) = socket.set_tcp_keepalive(&probes) {
        log::debug!("could not enable TCP keep-alive: {err}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = socket.set_tcp_user_timeout(Some(after)) {
        log::debug!("could not set TCP_USER_TIMEOUT: {err}");
    }
}

/// The unspecified address ("any interface") of the same family as `addr`.
pub fn unspecified_like(addr: &SocketAddr, port: u16) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
    }
}

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4 peer) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_and_an_outgoing_socket_share_one_port() {
        let remote = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = listen_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let port_p = listener.local_addr().unwrap();
        let outgoing = connect_from(port_p, remote.local_addr().unwrap()).await.unwrap();
        assert_eq!(outgoing.local_addr().unwrap(), port_p);
        let (_accepted, seen) = remote.accept().await.unwrap();
        assert_eq!(seen, port_p, "the remote sees the port we listen on");
        // And the listener still accepts on P.
        let _dialer = TcpStream::connect(port_p).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn keep_alive_is_set_for_bounds_that_are_not_multiples_of_eight_seconds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        // The tracker's 6 s bound: its probe interval (0.75 s) was rounded to 0 s, which the kernel
        // refused, leaving the connection without keep-alive at all.
        for (after, time, interval) in [(6, 1, 1), (8, 2, 1), (1, 1, 1), (16, 4, 2)] {
            detect_dead_peer(&stream, Duration::from_secs(after));
            let socket = socket2::SockRef::from(&stream);
            assert!(socket.keepalive().unwrap(), "{after} s");
            assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(time), "{after} s");
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(interval), "{after} s");
            assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_secs(after)), "{after} s");
        }
    }

    /// The socket state of every connection on `port` (netstat's view), from /proc.
    #[cfg(target_os = "linux")]
    fn states_on_port(port: u16) -> Vec<String> {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
                (local_port == port).then(|| fields[3].to_owned())
            })
            .collect()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn either_ending_delivers_the_bytes_and_frees_the_readers_port_once_it_closes() {
        use tokio::io::AsyncReadExt;
        for ending in [Ending::KernelResets, Ending::ResetBehind(Duration::from_secs(1))] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let client_port = client.local_addr().unwrap().port();
            let (server_side, _) = listener.accept().await.unwrap();
            if let Ending::KernelResets = ending {
                assert!(reset_after_fin(&server_side));
            }
            end_with(server_side, b"10.0.0.1:5-10.0.0.2:6", ending).await.unwrap();
            let mut buf = [0u8; 2048];
            let n = client.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"10.0.0.1:5-10.0.0.2:6", "{ending:?}");
            // Then the end: EOF (our FIN) or a reset behind it, depending on which was processed first.
            match client.read(&mut buf).await {
                Ok(0) => {}
                Err(err) => assert!(
                    matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe),
                    "{ending:?}: {err}"
                ),
                Ok(n) => panic!("{ending:?}: {n} more bytes"),
            }
            drop(client);
            // As the original client does right after: its port must be free, with no SO_REUSEADDR.
            let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let rebind = listener.bind(&SocketAddr::from(([127, 0, 0, 1], client_port)).into());
            assert!(
                rebind.is_ok(),
                "{ending:?}: port {client_port} still held: {:?} (states {:?})",
                rebind.err(),
                states_on_port(client_port)
            );
        }
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:1.2.3.4]:5".parse().unwrap();
        assert_eq!(canonical(mapped), "1.2.3.4:5".parse().unwrap());
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
