//! End to end in Rust: a real tracker on port 0 and real peers on loopback.

use std::time::Duration;

use p2pchat::peer::{self, Event, Events, PeerConfig, PeerHandle, Protocol};
use p2pchat::tracker::{Tracker, TrackerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

async fn start_tracker() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    let (addr, stop, _task) = start_tracker_with(config).await;
    (addr, stop)
}

async fn join(name: &str, tracker: std::net::SocketAddr) -> (PeerHandle, Events) {
    let (handle, events, _) = peer::join(PeerConfig::new(name, "127.0.0.1", tracker.port())).await.unwrap();
    (handle, events)
}

async fn next_message(events: &mut Events) -> peer::Message {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.expect("timed out").expect("peer closed") {
            Event::Message(m) => return m,
            _ => continue,
        }
    }
}

async fn wait_connections(handle: &PeerHandle, n: usize) {
    tokio::time::timeout(WAIT, async {
        while handle.peers().await.unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("connections did not open");
}

#[tokio::test]
async fn three_peers_every_line_reaches_every_other_peer() {
    let (tracker, _stop) = start_tracker().await;
    let (a, mut a_events) = join("ana", tracker).await;
    let (b, mut b_events) = join("bob", tracker).await;
    let (c, mut c_events) = join("cid", tracker).await;
    for h in [&a, &b, &c] {
        wait_connections(h, 2).await;
    }
    assert_eq!(a.send("from ana").await.unwrap(), 2);
    assert_eq!(c.send("from cid").await.unwrap(), 2);
    let mut at_b = vec![next_message(&mut b_events).await.text, next_message(&mut b_events).await.text];
    at_b.sort();
    assert_eq!(at_b, vec!["from ana", "from cid"]);
    assert_eq!(next_message(&mut a_events).await.text, "from cid");
    let m = next_message(&mut c_events).await;
    assert_eq!((m.sender.as_deref(), m.text.as_str()), (Some("ana"), "from ana"));
}

#[tokio::test]
async fn back_to_back_lines_arrive_as_separate_messages() {
    let (tracker, _stop) = start_tracker().await;
    let (a, _a_events) = join("ana", tracker).await;
    let (_b, mut b_events) = join("bob", tracker).await;
    wait_connections(&a, 1).await;
    for i in 0..50 {
        a.send(&format!("line {i}")).await.unwrap();
    }
    for i in 0..50 {
        assert_eq!(next_message(&mut b_events).await.text, format!("line {i}"));
    }
}

#[tokio::test]
async fn the_tracker_speaks_the_original_exchange() {
    let (tracker, _stop) = start_tracker().await;
    let mut first = TcpStream::connect(tracker).await.unwrap();
    let mut answer = Vec::new();
    let _ = first.read_to_end(&mut answer).await; // ends with a reset after the list
    assert_eq!(answer, b"-");
    let first_addr = first.local_addr().unwrap();
    let mut second = TcpStream::connect(tracker).await.unwrap();
    let mut answer = Vec::new();
    let _ = second.read_to_end(&mut answer).await;
    assert_eq!(answer, first_addr.to_string().as_bytes());
}

/// A peer written the way the original client is: tracker exchange from port P, then listen on P, then
/// raw bytes with no handshake.
#[tokio::test]
async fn a_raw_original_style_peer_chats_with_a_p2pchat_peer() {
    let (tracker, _stop) = start_tracker().await;
    // No SO_REUSEADDR anywhere, as in the original: the bind after the exchange only works because the
    // tracker's reset left nothing behind.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port_p = socket.local_addr().unwrap();
    let mut exchange = socket.connect(tracker).await.unwrap();
    let mut buf = [0u8; 2048];
    let n = exchange.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"-");
    drop(exchange);
    let listener_socket = tokio::net::TcpSocket::new_v4().unwrap();
    listener_socket.bind(port_p).expect("the original client can listen on its port");
    let original = listener_socket.listen(16).unwrap();
    let (p, mut p_events) = join("ana", tracker).await;
    let (mut link, _) = tokio::time::timeout(WAIT, original.accept()).await.unwrap().unwrap();
    link.write_all("<orig> :: olá".as_bytes()).await.unwrap();
    let m = next_message(&mut p_events).await;
    assert_eq!((m.sender.as_deref(), m.text.as_str()), (Some("orig"), "olá"));
    assert_eq!(p.send("hi orig").await.unwrap(), 1);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, link.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"<ana> :: hi orig");
}

/// An original peer writes each line in one `write`, so a character is split only at a TCP segment
/// boundary, and the rest follows after a retransmission (200 ms and more). The text before it is
/// shown at once; the character waits for the rest, however long, and is never shown as U+FFFD.
#[tokio::test]
async fn a_character_split_across_reads_far_apart_is_joined() {
    let (tracker, _stop) = start_tracker().await;
    let (ana, mut ana_events) = join("ana", tracker).await;
    let mut orig = TcpStream::connect(ana.listen_addr()).await.unwrap();
    let line = "<orig> :: split-olá-mundo".as_bytes();
    let cut = line.iter().position(|b| *b == 0xC3).unwrap() + 1;
    orig.write_all(&line[..cut]).await.unwrap();
    let first = next_message(&mut ana_events).await;
    assert_eq!((first.sender.as_deref(), first.text.as_str()), (Some("orig"), "split-ol"));
    // The gap is what is tested here (four times the hold-back), not a wait for something.
    tokio::time::sleep(Duration::from_millis(200)).await;
    orig.write_all(&line[cut..]).await.unwrap();
    let rest = next_message(&mut ana_events).await;
    assert_eq!((rest.text.as_str(), rest.starts_message), ("á-mundo", false), "the same line, continued");
}

/// A port scanner's bytes are not a chat peer's: an original peer's stream opens with `<NAME> :: `.
/// The connection is dropped, and nothing it sent is shown or logged (before, newcomers were even
/// served it as history). A real original peer right after it is shown as ever.
#[tokio::test]
async fn bytes_that_open_with_no_header_are_dropped_unshown_and_unlogged() {
    let (tracker, _stop) = start_tracker().await;
    let (ana, mut ana_events) = join("ana", tracker).await;
    for junk in [&b"gM\x8f\x00\x17 scanner bytes"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"<not a header at all"] {
        let mut scanner = TcpStream::connect(ana.listen_addr()).await.unwrap();
        scanner.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(WAIT, scanner.read(&mut buf)).await.expect("ana dropped it");
        assert!(matches!(closed, Ok(0) | Err(_)), "{junk:?}: {closed:?}");
    }
    let mut orig = TcpStream::connect(ana.listen_addr()).await.unwrap();
    orig.write_all(b"<orig> :: after the scan").await.unwrap();
    let mut shown = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
            Event::Message(m) if m.text == "after the scan" => break,
            other => shown.push(format!("{other:?}")),
        }
    }
    assert!(shown.iter().all(|e| !e.contains("scanner") && !e.contains("GET")), "{shown:?}");
    let logged: Vec<String> = ana.history(100, None).await.unwrap().into_iter().map(|r| r.text).collect();
    assert_eq!(logged, vec!["after the scan".to_owned()]);
}

/// Open a link to `at` as a p2pchat member whose hello lists `peers`; the stream after the magic.
async fn hello_listing(at: std::net::SocketAddr, peers: Vec<p2pchat::wire::frames::Member>) -> TcpStream {
    use p2pchat::protocol::PROTOCOL_VERSION;
    use p2pchat::wire::frames::{self, Frame, Hello};
    let mut stream = TcpStream::connect(at).await.unwrap();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: frames::random_id(),
        name: Some("mallory".into()),
        room: String::new(),
        listen_port: None,
        peers,
        identity: None,
        relay: false,
        quiet: false,
    };
    stream.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
    stream
}

/// Peer exchange cannot turn a peer into a port scanner for the member who writes the list:
/// a hello listing more than a room holds is refused; a shorter one is dialled a few addresses at a
/// time; and an address that answers but is not the p2pchat member announced (here, ports that
/// accept and say nothing) is neither shown nor listed in our hellos, so the list's author learns
/// nothing of which ports are open. The room goes on.
#[tokio::test]
async fn peer_exchange_cannot_make_a_peer_a_scanner() {
    use p2pchat::wire::frames::{self, Frame, Member};
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.probe_timeout = Duration::from_millis(300);
    let (ana, mut ana_events, _) = peer::join(config).await.unwrap();
    let member =
        |addr: std::net::SocketAddr| Member { addr: addr.to_string(), p2pchat: true, id: Some(frames::random_id()) };
    // 5,000 addresses: refused, nothing dialled.
    // (Without session ids, as an older version sends them: under the frame size bound.)
    let huge: Vec<Member> = (0..5_000)
        .map(|i| Member { id: None, ..member(std::net::SocketAddr::from(([127, 0, 0, 1], 20_000 + i))) })
        .collect();
    let mut refused = hello_listing(ana.listen_addr(), huge).await;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, refused.read_to_end(&mut answer)).await.expect("the link was closed").unwrap();
    assert!(String::from_utf8_lossy(&answer).contains("more than a room holds"), "{answer:?}");
    // 40 ports that accept and stay silent, counted: how many of ana's dials are open at once.
    #[derive(Default, Clone, Copy, Debug)]
    struct Dials {
        accepted: usize,
        open: usize,
        most_open: usize,
    }
    let (counts, mut watch) = tokio::sync::watch::channel(Dials::default());
    let counts = std::sync::Arc::new(counts);
    let mut silent = Vec::new();
    for _ in 0..40 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        silent.push(listener.local_addr().unwrap());
        let counts = counts.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counts.send_modify(|d| {
                    d.accepted += 1;
                    d.open += 1;
                    d.most_open = d.most_open.max(d.open);
                });
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = stream.read_to_end(&mut sink).await;
                    counts.send_modify(|d| d.open -= 1);
                });
            }
        });
    }
    let _mallory = hello_listing(ana.listen_addr(), silent.iter().map(|a| member(*a)).collect()).await;
    let dials = *tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|d| d.accepted >= 40 && d.open == 0))
        .await
        .expect("ana dialled every address and gave each up")
        .unwrap();
    assert!(dials.most_open <= 8, "{} dials open at once: {dials:?}", dials.most_open);
    // None of them is shown or listed, to ana or in her hello to a newcomer.
    let listed: Vec<_> = ana.peers().await.unwrap().into_iter().filter(|p| silent.contains(&p.addr)).collect();
    assert!(listed.is_empty(), "{listed:?}");
    let mut bob = RawMember::join(ana.listen_addr(), "bob-session", "bob").await;
    let advertised: Vec<_> =
        bob.their_hello.peers.iter().filter(|m| silent.iter().any(|a| a.to_string() == m.addr)).collect();
    assert!(advertised.is_empty(), "ana's hello lists {advertised:?}");
    ana.send("still chatting").await.unwrap();
    bob.next(|f| matches!(f, Frame::Msg(m) if m.text == "still chatting")).await;
    while let Ok(Some(event)) = ana_events.try_recv() {
        if let Event::Joined { addr, .. } = event {
            assert!(!silent.contains(&addr), "{addr} was shown joining");
        }
    }
}

/// An original peer that a member names to us (peer exchange, for a peer that joined through
/// members alone) is linked, and sent our lines, but shown and listed only once it says a line: a
/// silent port would tell the member's author nothing.
#[tokio::test]
async fn an_original_peer_named_by_a_member_is_shown_once_it_speaks() {
    let orig = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orig_addr = orig.local_addr().unwrap();
    // Bob reaches the original peer: his probe is dropped (as the original drops a 0xFF), and his
    // second dial speaks the original protocol.
    let mut bob_config = PeerConfig::new("bob", "127.0.0.1", 1);
    bob_config.tracker = None;
    bob_config.peers = vec![orig_addr];
    let bob_joining = tokio::spawn(peer::join(bob_config));
    let (probe, _) = tokio::time::timeout(WAIT, orig.accept()).await.unwrap().unwrap();
    drop(probe);
    let (_from_bob, _) = tokio::time::timeout(WAIT, orig.accept()).await.unwrap().unwrap();
    let (bob, _bob_events, _) = bob_joining.await.unwrap().unwrap();
    // Ana joins through bob alone, and hears of the original peer in his hello.
    let mut ana_config = PeerConfig::new("ana", "127.0.0.1", 1);
    ana_config.tracker = None;
    ana_config.peers = vec![bob.listen_addr()];
    let (ana, mut ana_events, _) = peer::join(ana_config).await.unwrap();
    let (mut from_ana, _) = tokio::time::timeout(WAIT, orig.accept()).await.unwrap().unwrap();
    // Ana's link to it is up once a line of hers arrives there (a line sent before it was up is
    // not carried to it, as with the original).
    let mut got = [0u8; 64];
    let n = tokio::time::timeout(WAIT, async {
        loop {
            ana.send("to everyone").await.unwrap();
            if let Ok(read) = tokio::time::timeout(Duration::from_millis(100), from_ana.read(&mut got)).await {
                return read.unwrap();
            }
        }
    })
    .await
    .expect("ana's line reached the original peer");
    assert!(got[..n].starts_with(b"<ana> :: to everyone"), "linked, and sent our lines");
    assert!(ana.peers().await.unwrap().iter().all(|p| p.addr != orig_addr), "listed before it said a line");
    from_ana.write_all(b"<orig> :: hi ana").await.unwrap();
    // Its line and its join (the line goes straight to the screen; the join comes from the state).
    let (mut joined, mut said) = (false, false);
    while !(joined && said) {
        match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
            Event::Joined { addr, name, protocol, .. } if addr == orig_addr => {
                assert_eq!((name.as_deref(), protocol), (Some("orig"), Protocol::Original));
                joined = true;
            }
            Event::Message(m) if m.text == "hi ana" => said = true,
            _ => {}
        }
    }
    assert!(ana.peers().await.unwrap().iter().any(|p| p.addr == orig_addr));
}

#[tokio::test]
async fn close_delivers_queued_lines_and_tells_the_others() {
    let (tracker, _stop) = start_tracker().await;
    let (a, _a_events) = join("ana", tracker).await;
    let (_b, mut b_events) = join("bob", tracker).await;
    wait_connections(&a, 1).await;
    a.send("bye").await.unwrap();
    a.close().await;
    assert!(a.send("after close").await.is_err());
    assert_eq!(next_message(&mut b_events).await.text, "bye");
    loop {
        match tokio::time::timeout(WAIT, b_events.recv()).await.unwrap().unwrap() {
            Event::Left { name, clean, reason, .. } => {
                assert_eq!(name.as_deref(), Some("ana"));
                assert!(clean, "ana said goodbye, but the link ended with: {reason}");
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_peer_that_leaves_before_its_links_have_answered_says_goodbye_on_each() {
    // Its join returns once every member is connected; each has its hello, and may have adopted it,
    // before the newcomer reads the answer. Leaving then must still be a goodbye to each, or the
    // members take it for lost and dial it again.
    let (tracker, _stop) = start_tracker().await;
    let mut members = Vec::new();
    for i in 0..12 {
        members.push(join(&format!("m{i}"), tracker).await);
    }
    for (handle, _) in &members {
        wait_p2pchat_links(handle, 11).await;
    }
    let (newcomer, _events) = join("new", tracker).await;
    newcomer.close().await;
    for (i, (_, events)) in members.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("no leave within the bound")
                .expect("member closed")
            {
                Event::Left { name, clean, reason, .. } if name.as_deref() == Some("new") => {
                    assert!(clean, "member m{i} saw the newcomer lost, not leaving: {reason}");
                    break;
                }
                _ => continue,
            }
        }
    }
}

#[tokio::test]
async fn a_listed_address_that_refuses_is_skipped() {
    let (tracker, _stop) = start_tracker().await;
    // Register an address nobody listens on.
    let ghost = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ghost_addr = ghost.local_addr().unwrap();
    drop(ghost);
    let mut exchange = p2pchat::net::connect_from(ghost_addr, tracker).await.unwrap();
    let _ = exchange.read_to_end(&mut Vec::new()).await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.retry_refused_for = Duration::from_millis(300);
    let (handle, _events, report) = peer::join(config).await.unwrap();
    assert_eq!((report.listed, report.connected), (1, 0));
    assert_eq!(handle.send("anyone?").await.unwrap(), 0);
}

/// A member that stops reading fills its own queue and is dropped; the others get every line.
#[tokio::test]
async fn a_peer_that_never_reads_is_dropped_without_holding_back_the_others() {
    // Its queue reaches the byte bound (64 KiB lines), long before it could count as stalled.
    dropped_for_not_reading(Duration::from_secs(3600), 1 << 20, "not reading fast enough").await;
}

/// ... or, below the byte bound, its queue stays past its line bound with nothing taken.
#[tokio::test]
async fn a_peer_that_never_reads_is_dropped_once_its_queue_stalls() {
    dropped_for_not_reading(Duration::from_millis(300), 1 << 30, "none taken for 300ms").await;
}

/// A member whose application stops reading for a while falls far behind (its kernel buffers full,
/// its queue here past its line bound) but keeps taking lines once it reads again: it keeps its link
/// and gets every line live, in order.
#[tokio::test]
async fn a_member_behind_keeps_its_link_and_gets_every_line() {
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.send_queue = 4;
    config.limits.stalled_after = Duration::from_secs(30);
    let (ana, mut ana_events, _) = peer::join(config).await.unwrap();
    let mut bob_config = PeerConfig::new("bob", "127.0.0.1", tracker.port());
    bob_config.limits.event_queue = 1; // bob's links stop reading while its application does
    bob_config.limits.max_message_rate = u32::MAX / 4;
    let (_bob, mut bob_events, _) = peer::join(bob_config).await.unwrap();
    wait_p2pchat_links(&ana, 1).await;
    // 300 lines of ~64 KiB: more than the sockets between them hold, so most wait in ana's queue.
    let big = "x".repeat(p2pchat::wire::chat::MAX_TEXT_BYTES - 8);
    for i in 0..300 {
        assert_eq!(ana.send(&format!("{i:05}{big}")).await.unwrap(), 1, "bob was dropped at line {i}");
    }
    for i in 0..300 {
        let m = next_message(&mut bob_events).await;
        assert_eq!((&m.text[..5], m.history), (format!("{i:05}").as_str(), false));
    }
    while let Ok(Some(event)) = ana_events.try_recv() {
        assert!(!matches!(event, Event::Left { .. }), "ana dropped bob: {event:?}");
    }
    assert_eq!(ana.peers().await.unwrap().len(), 1);
}

async fn dropped_for_not_reading(stalled_after: Duration, send_queue_bytes: usize, why: &str) {
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.send_queue = 4;
    config.limits.stalled_after = stalled_after;
    config.limits.send_queue_bytes = send_queue_bytes;
    let (ana, mut ana_events, _) = peer::join(config).await.unwrap();
    let mut bob_config = PeerConfig::new("bob", "127.0.0.1", tracker.port());
    bob_config.limits.max_message_rate = u32::MAX / 4; // bob takes the whole flood on purpose
    let (_bob, mut bob_events, _) = peer::join(bob_config).await.unwrap();
    // A raw connection that never reads: its kernel buffers fill, then its queue. It sends nothing, so
    // ana takes it for an original peer once `decide_timeout` has passed.
    let _stuck = TcpStream::connect(ana.listen_addr()).await.unwrap();
    let mut joined = 0;
    while joined < 2 {
        if let Event::Joined { .. } = tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
            joined += 1;
        }
    }
    let big = "x".repeat(p2pchat::wire::chat::MAX_TEXT_BYTES);
    let mut sent = 0;
    let dropped_reason = loop {
        assert!(sent < 2_000, "the stuck peer was never dropped");
        ana.send(&big).await.unwrap();
        sent += 1;
        // Drain ana's events to see the drop as soon as it happens.
        match tokio::time::timeout(Duration::from_millis(1), ana_events.recv()).await {
            Ok(Some(Event::Left { reason, .. })) => break reason,
            _ => continue,
        }
    };
    assert!(dropped_reason.contains(why), "{dropped_reason}");
    assert_eq!(ana.peers().await.unwrap().len(), 1);
    let mut received = 0;
    let mut bytes = 0;
    while received < sent {
        let m = next_message(&mut bob_events).await;
        bytes += m.text.len();
        if bytes >= (received + 1) * big.len() {
            received = bytes / big.len();
        }
    }
    assert_eq!(bytes, sent * big.len(), "bob got every byte of every line");
}

async fn join_room(name: &str, tracker: std::net::SocketAddr, room: &str) -> (PeerHandle, Events) {
    let mut config = PeerConfig::new(name, "127.0.0.1", tracker.port());
    config.room = room.to_owned();
    let (handle, events, _) = peer::join(config).await.unwrap();
    (handle, events)
}

async fn wait_p2pchat_links(handle: &PeerHandle, n: usize) {
    tokio::time::timeout(WAIT, async {
        loop {
            let peers = handle.peers().await.unwrap();
            if peers.iter().filter(|p| p.protocol == Some(Protocol::P2pchat)).count() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("p2pchat links did not open");
}

#[tokio::test]
async fn rooms_do_not_hear_each_other() {
    let (tracker, _stop) = start_tracker().await;
    let (a, mut a_events) = join_room("ana", tracker, "red").await;
    let (b, mut b_events) = join_room("bob", tracker, "red").await;
    let (c, mut c_events) = join_room("cid", tracker, "blue").await;
    wait_p2pchat_links(&a, 1).await;
    wait_p2pchat_links(&b, 1).await;
    assert_eq!(c.send("blue only").await.unwrap(), 0);
    assert_eq!(a.send("red only").await.unwrap(), 1);
    let m = next_message(&mut b_events).await;
    assert_eq!((m.text.as_str(), m.id.is_some()), ("red only", true));
    b.send("red reply").await.unwrap();
    assert_eq!(next_message(&mut a_events).await.text, "red reply");
    assert!(tokio::time::timeout(Duration::from_millis(300), next_message(&mut c_events)).await.is_err());
}

/// Under a tracker that says nothing about protocols (the original's list), p2pchat peers still find
/// each other through the probe.
#[tokio::test]
async fn p2pchat_peers_upgrade_without_a_p2pchat_tracker() {
    // Join b directly through a's address, as `--peer` does.
    let (tracker, _stop) = start_tracker().await;
    let (a, mut a_events) = join("ana", tracker).await;
    let mut config = PeerConfig::new("bob", "", 0);
    config.tracker = None;
    config.peers = vec![std::net::SocketAddr::from(([127, 0, 0, 1], a.listen_addr().port()))];
    let (b, mut b_events, report) = peer::join(config).await.unwrap();
    assert_eq!((report.listed, report.connected), (1, 1));
    wait_p2pchat_links(&b, 1).await;
    b.send("via --peer").await.unwrap();
    let m = next_message(&mut a_events).await;
    assert!(m.id.is_some(), "it came as a p2pchat frame");
    a.nick("ana2").await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, b_events.recv()).await.unwrap().unwrap() {
            Event::Renamed { old, new, .. } => {
                assert_eq!((old.as_deref(), new.as_str()), (Some("ana"), "ana2"));
                break;
            }
            _ => continue,
        }
    }
    a.send("renamed").await.unwrap();
    let m = next_message(&mut b_events).await;
    assert_eq!((m.sender.as_deref(), m.text.as_str()), (Some("ana2"), "renamed"));
}

/// A third peer joining through one member learns the rest of the room from it (peer exchange).
#[tokio::test]
async fn joining_through_one_member_reaches_the_whole_room() {
    let (tracker, _stop) = start_tracker().await;
    let (a, _a_events) = join("ana", tracker).await;
    let (b, _b_events) = join("bob", tracker).await;
    wait_p2pchat_links(&a, 1).await;
    wait_p2pchat_links(&b, 1).await;
    let mut config = PeerConfig::new("cid", "", 0);
    config.tracker = None;
    config.peers = vec![std::net::SocketAddr::from(([127, 0, 0, 1], a.listen_addr().port()))];
    let (c, _c_events, _) = peer::join(config).await.unwrap();
    wait_p2pchat_links(&c, 2).await;
}

/// Two peers that dial each other at the same moment keep one link between them (both ends pick the
/// same one), and chat over it.
#[tokio::test]
async fn peers_dialling_each_other_at_once_keep_one_link() {
    for _ in 0..5 {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (pa, pb) = (free(), free());
        let config = |name: &str, own: std::net::SocketAddr, other: std::net::SocketAddr| {
            let mut c = PeerConfig::new(name, "", 0);
            c.tracker = None;
            c.listen_port = Some(own.port());
            c.peers = vec![other];
            c
        };
        let (a, b) = tokio::join!(peer::join(config("ana", pa, pb)), peer::join(config("bob", pb, pa)));
        let ((a, mut a_events, _), (b, mut b_events, _)) = (a.unwrap(), b.unwrap());
        wait_p2pchat_links(&a, 1).await;
        wait_p2pchat_links(&b, 1).await;
        a.send("to bob").await.unwrap();
        b.send("to ana").await.unwrap();
        assert_eq!(next_message(&mut b_events).await.text, "to bob");
        assert_eq!(next_message(&mut a_events).await.text, "to ana");
        // Whatever duplicate existed has been retired by now on both sides.
        tokio::time::timeout(WAIT, async {
            while a.peers().await.unwrap().len() != 1 || b.peers().await.unwrap().len() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("one link each");
        a.close().await;
        b.close().await;
    }
}

/// A second link from a member already linked is refused with `duplicate`, never just closed: a
/// probe closed before any hello would make its dialler take this peer for an original one (and
/// dial it again speaking the original protocol, so every message would arrive twice).
#[tokio::test]
async fn a_second_link_from_a_linked_member_is_refused_as_a_duplicate() {
    use p2pchat::protocol::{MAGIC, PROTOCOL_VERSION};
    use p2pchat::wire::frames::{self, Frame, Hello, ERR_DUPLICATE};
    let (tracker, _stop) = start_tracker().await;
    let (ana, _ana_events) = join("ana", tracker).await;
    let mut first = RawMember::join(ana.listen_addr(), "zed-session", "zed").await;

    let mut second = TcpStream::connect(ana.listen_addr()).await.unwrap();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: "zed-session".into(),
        name: Some("zed".into()),
        room: String::new(),
        listen_port: None,
        peers: vec![],
        identity: None,
        relay: false,
        quiet: false,
    };
    second.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, second.read_to_end(&mut answer)).await.expect("the second link was not closed").unwrap();
    assert!(answer.starts_with(MAGIC), "closed without a word: {answer:?}");
    let mut decoder = frames::FrameDecoder::new();
    decoder.feed(&answer[MAGIC.len()..]);
    let Ok(Some(Frame::Error { code, .. })) = decoder.next_frame() else { panic!("no error frame: {answer:?}") };
    assert_eq!(code, ERR_DUPLICATE);

    // The first link is the one kept.
    ana.send("still here").await.unwrap();
    let Frame::Msg(chat) = first.next(|f| matches!(f, Frame::Msg(_))).await else { unreachable!() };
    assert_eq!(chat.text, "still here");
    assert_eq!(ana.peers().await.unwrap().len(), 1);
}

async fn start_tracker_with(
    config: TrackerConfig,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let tracker = Tracker::bind(config).await.unwrap();
    let addr = tracker.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tracker.run(async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

async fn wait_members(handle: &p2pchat::tracker::TrackerHandle, n: usize) {
    tokio::time::timeout(WAIT, async {
        while handle.members("").await.unwrap().len() != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the tracker never listed {n} member(s)"));
}

/// A tracker whose registrations may stay silent for `bound`, and a bare registration with it (a hello,
/// `quiet` or not, then whatever the test sends).
async fn registered_under(bound: Duration, quiet: bool) -> (TcpStream, p2pchat::tracker::TrackerHandle) {
    use p2pchat::protocol::PROTOCOL_VERSION;
    use p2pchat::wire::frames::{self, Frame, Hello};
    let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    config.registration_timeout = bound;
    let tracker = Tracker::bind(config).await.unwrap();
    let (addr, handle) = (tracker.local_addr(), tracker.handle());
    tokio::spawn(tracker.run(std::future::pending()));
    let mut member = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: "x".into(),
        name: None,
        room: String::new(),
        listen_port: Some(1),
        peers: vec![],
        identity: None,
        relay: false,
        quiet,
    };
    member.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
    wait_members(&handle, 1).await;
    (member, handle)
}

/// A registration that goes silent (no pings, no FIN: the peer vanished) is dropped.
#[tokio::test]
async fn the_tracker_drops_a_silent_registration() {
    let (_silent, handle) = registered_under(Duration::from_millis(300), false).await;
    wait_members(&handle, 0).await;
}

/// A registration that keeps pinging stays well past its silence bound; once it stops, it is dropped.
#[tokio::test]
async fn the_tracker_keeps_a_registration_that_pings() {
    use p2pchat::wire::frames::{self, Frame};
    let bound = Duration::from_millis(300);
    let (mut member, handle) = registered_under(bound, false).await;
    // Pinging at a third of the bound, for four bounds: the pace a peer keeps, not a wait for an event.
    for _ in 0..12 {
        tokio::time::sleep(bound / 3).await;
        member.write_all(&frames::encode(&Frame::Ping)).await.expect("the tracker dropped a member that pings");
    }
    assert_eq!(handle.members("").await.unwrap().len(), 1, "a member that pings was dropped");
    wait_members(&handle, 0).await;
}

/// A registration whose hello said `quiet` is told the tracker needs no pings either, and is kept
/// while it says nothing (the kernel's keep-alive watches it); once it closes, it is dropped.
#[tokio::test]
async fn the_tracker_keeps_a_quiet_registration_without_pings() {
    use p2pchat::protocol::MAGIC;
    use p2pchat::wire::frames::{Frame, FrameDecoder};
    let bound = Duration::from_millis(300);
    let (mut member, handle) = registered_under(bound, true).await;
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, member.read(&mut answer)).await.unwrap().unwrap();
    let mut decoder = FrameDecoder::new();
    decoder.feed(&answer[MAGIC.len()..n]);
    assert!(matches!(decoder.next_frame(), Ok(Some(Frame::Welcome { quiet: true, .. }))), "no quiet welcome");
    // Four silence bounds without a word: a measuring window, not a wait for an event. A registration
    // that did not say `quiet` is gone by then (the test above).
    tokio::time::sleep(bound * 4).await;
    assert_eq!(handle.members("").await.unwrap().len(), 1, "the quiet member was dropped for its silence");
    drop(member);
    wait_members(&handle, 0).await;
}

/// A peer pings its registration only when the tracker's welcome asks for it (no `quiet`): a tracker
/// of this version says `quiet` to a hello that did, and then hears nothing while the room is idle.
#[tokio::test]
async fn a_peer_pings_its_tracker_only_when_the_welcome_asks_for_it() {
    use p2pchat::protocol::MAGIC;
    use p2pchat::wire::frames::{Frame, FrameDecoder, Offers, Welcome};
    for quiet in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tracker = tokio::spawn(async move {
            let (mut stream, from) = listener.accept().await.unwrap();
            let mut decoder = FrameDecoder::new();
            let mut magic = vec![0; MAGIC.len()];
            stream.read_exact(&mut magic).await.unwrap();
            let hello = loop {
                if let Some(Frame::Hello(hello)) = decoder.next_frame().unwrap() {
                    break hello;
                }
                let mut buf = [0; 1024];
                let n = stream.read(&mut buf).await.unwrap();
                decoder.feed(&buf[..n]);
            };
            assert!(hello.quiet, "a peer of this version says quiet to its tracker");
            let welcome = Welcome::new(Vec::new(), &from.to_string(), Offers { relay: false, quiet });
            let bytes: Vec<u8> = welcome.slices().iter().flat_map(|s| s.iter().copied()).collect();
            stream.write_all(&bytes).await.unwrap();
            // Ten keep-alive periods: a measuring window, not a wait for an event.
            let mut heard = Vec::new();
            let window = tokio::time::sleep(Duration::from_millis(1000));
            tokio::pin!(window);
            loop {
                let mut buf = [0; 1024];
                tokio::select! {
                    () = &mut window => break,
                    read = stream.read(&mut buf) => match read {
                        Ok(n) if n > 0 => decoder.feed(&buf[..n]),
                        _ => break,
                    },
                }
                while let Some(frame) = decoder.next_frame().unwrap() {
                    heard.push(frame);
                }
            }
            heard
        });
        let mut config = PeerConfig::new("ana", "127.0.0.1", port);
        config.limits.keepalive_interval = Duration::from_millis(100);
        let (ana, _events, _) = peer::join(config).await.unwrap();
        let heard = tokio::time::timeout(WAIT, tracker).await.unwrap().unwrap();
        let pings = heard.iter().filter(|f| matches!(f, Frame::Ping)).count();
        if quiet {
            assert_eq!(pings, 0, "pinged a tracker that said quiet: {heard:?}");
        } else {
            assert!(pings >= 5, "{pings} pings in ten keep-alive periods to a tracker that asked for them");
        }
        ana.close().await;
    }
}

/// A p2pchat link that stops carrying anything (not even pings) is dropped as lost.
#[tokio::test]
async fn a_silent_p2pchat_link_is_dropped() {
    use p2pchat::protocol::PROTOCOL_VERSION;
    use p2pchat::wire::frames::{self, Frame, Hello};
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.dead_after = Duration::from_millis(400);
    let (ana, mut events, _) = peer::join(config).await.unwrap();
    let mut impostor = TcpStream::connect(ana.listen_addr()).await.unwrap();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: "ghost".into(),
        name: Some("ghost".into()),
        room: String::new(),
        listen_port: None,
        peers: vec![],
        identity: None,
        relay: false,
        quiet: false,
    };
    impostor.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::Left { name, reason, clean, .. } => {
                assert_eq!((name.as_deref(), clean), (Some("ghost"), false));
                assert!(reason.contains("silent"), "{reason}");
                break;
            }
            _ => continue,
        }
    }
}

/// A member whose hello says `quiet` is not pinged, and its silence does not drop it: the kernel's
/// keep-alive watches that link. A member whose hello does not (an earlier p2pchat) is pinged, and
/// dropped when it stays silent, as before.
#[tokio::test]
async fn quiet_members_are_neither_pinged_nor_dropped_for_their_silence() {
    use p2pchat::wire::frames::{Chat, Frame};
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.keepalive_interval = Duration::from_millis(100);
    config.limits.dead_after = Duration::from_millis(400);
    let (ana, mut events, _) = peer::join(config).await.unwrap();
    let mut quiet = RawMember::join_as(ana.listen_addr(), "quiet-id", "quiet", "", true).await;
    assert!(quiet.their_hello.quiet, "ana says she needs no pings either");
    let mut earlier = RawMember::join_as(ana.listen_addr(), "earlier-id", "earlier", "", false).await;
    assert!(matches!(earlier.next(|f| matches!(f, Frame::Ping)).await, Frame::Ping));
    // The earlier member never answers: dropped once silent for 400 ms, four keep-alive periods
    // after the quiet member joined, which stayed just as silent.
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::Left { name, reason, .. } => {
                assert_eq!(
                    name.as_deref(),
                    Some("earlier"),
                    "only the member that asked for pings is dropped: {reason}"
                );
                assert!(reason.contains("silent"), "{reason}");
                break;
            }
            _ => continue,
        }
    }
    let mut frames_to_quiet = Vec::new();
    let mut buf = [0; 4096];
    while let Ok(n @ 1..) = quiet.stream.try_read(&mut buf) {
        quiet.decoder.feed(&buf[..n]);
    }
    while let Some(frame) = quiet.decoder.next_frame().unwrap() {
        frames_to_quiet.push(frame);
    }
    assert!(!frames_to_quiet.iter().any(|f| matches!(f, Frame::Ping)), "pinged: {frames_to_quiet:?}");
    // Its link is alive: what it says now is shown.
    let chat = Chat { id: "q1".into(), from: "quiet".into(), ts: 1, text: "still here".into(), ..Chat::default() };
    quiet.send(&Frame::Msg(chat)).await;
    assert_eq!(next_message(&mut events).await.text, "still here");
    assert_eq!(ana.peers().await.unwrap().len(), 1, "the quiet member is still listed");
}

/// The tracker restarts with an empty memory: running peers register again on their own, and a
/// newcomer finds the whole room.
#[tokio::test]
async fn peers_register_again_after_a_tracker_restart() {
    let config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    let (addr, stop, task) = start_tracker_with(config.clone()).await;
    let (a, _a_events) = join("ana", addr).await;
    let (b, mut b_events) = join("bob", addr).await;
    wait_p2pchat_links(&a, 1).await;
    let _ = stop.send(());
    task.await.unwrap();
    // The room goes on without its tracker: nothing is lost between the members.
    for i in 0..20 {
        a.send(&format!("while the tracker is down {i}")).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(next_message(&mut b_events).await.text, format!("while the tracker is down {i}"));
    }
    let mut config = config;
    config.listen = addr;
    let tracker = Tracker::bind(config).await.unwrap();
    let handle = tracker.handle();
    tokio::spawn(tracker.run(std::future::pending()));
    wait_members(&handle, 2).await;
    let (c, _c_events, report) = peer::join(PeerConfig::new("cid", "127.0.0.1", addr.port())).await.unwrap();
    assert_eq!((report.listed, report.connected), (2, 2));
    wait_p2pchat_links(&c, 2).await;
    drop(b);
}

/// The original client's exchange, as the original does it (no SO_REUSEADDR); returns its port.
async fn original_exchange(tracker: std::net::SocketAddr) -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port_p = socket.local_addr().unwrap();
    let mut exchange = socket.connect(tracker).await.unwrap();
    let _ = exchange.read_to_end(&mut Vec::new()).await;
    port_p
}

async fn tracker_with_ttl(ttl: Duration) -> (std::net::SocketAddr, p2pchat::tracker::TrackerHandle) {
    let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    config.original_ttl = ttl;
    config.probe_timeout = Duration::from_millis(500);
    let tracker = Tracker::bind(config).await.unwrap();
    let (addr, handle) = (tracker.local_addr(), tracker.handle());
    tokio::spawn(tracker.run(std::future::pending()));
    (addr, handle)
}

/// Counts connections accepted by a listener standing in for an original peer.
fn count_accepts(listener: TcpListener) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    count
}

#[tokio::test]
async fn an_original_peer_that_left_is_forgotten() {
    let (tracker, handle) = tracker_with_ttl(Duration::from_millis(200)).await;
    original_exchange(tracker).await; // and it never listens: it is gone
    wait_members(&handle, 1).await;
    wait_members(&handle, 0).await;
}

#[tokio::test]
async fn a_live_original_peer_nobody_vouches_for_is_probed_and_kept() {
    let (tracker, handle) = tracker_with_ttl(Duration::from_millis(200)).await;
    let port_p = original_exchange(tracker).await;
    let accepts = count_accepts(TcpListener::bind(port_p).await.unwrap());
    tokio::time::timeout(WAIT, async {
        while accepts.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the tracker probes an unvouched original now and then");
    assert_eq!(handle.members("").await.unwrap().len(), 1, "it answered, so it stays listed");
}

#[tokio::test]
async fn an_original_peer_a_member_vouches_for_is_not_probed() {
    let (tracker, handle) = tracker_with_ttl(Duration::from_millis(600)).await;
    let port_p = original_exchange(tracker).await;
    let accepts = count_accepts(TcpListener::bind(port_p).await.unwrap());
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.keepalive_interval = Duration::from_millis(100);
    let (_ana, _events, report) = peer::join(config).await.unwrap();
    assert_eq!(report.connected, 1);
    // Several TTLs pass: ana vouches every 100 ms, so the tracker never needs to probe.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(accepts.load(std::sync::atomic::Ordering::SeqCst), 1, "only ana's own link");
    assert_eq!(handle.members("").await.unwrap().len(), 2);
}

/// A member that floods is muted locally (one notice), and shown again once it slows down. (How many
/// of a burst are shown depends on how fast it arrives here; the exact counts, in virtual time, are
/// in `state::rules`' flood tests.)
#[tokio::test]
async fn a_flooding_member_is_muted() {
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.limits.max_message_rate = 10;
    let (ana, mut events, _) = peer::join(config).await.unwrap();
    let (bob, _bob_events) = join("bob", tracker).await;
    wait_p2pchat_links(&ana, 1).await;
    for i in 0..100 {
        bob.send(&format!("spam {i}")).await.unwrap();
    }
    let (mut shown, mut notices) = (0, Vec::new());
    while notices.is_empty() {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::Message(_) => shown += 1,
            Event::Notice { text } => notices.push(text),
            _ => {}
        }
    }
    // The burst (3 x 10) was shown, and then the flood was cut: the 100 lines went out far faster
    // than 10 a second.
    assert!((30..100).contains(&shown), "{shown} shown before the mute");
    assert!(notices[0].starts_with("muting bob"), "{notices:?}");
    // Later, at a calm pace, bob is shown again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send("calm again").await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::Message(m) => {
                assert_eq!(m.text, "calm again");
                break;
            }
            Event::Notice { text } => assert!(text.contains("no longer muted"), "{text}"),
            _ => {}
        }
    }
}

/// A hand-driven p2pchat member: the opening, then frames.
struct RawMember {
    stream: TcpStream,
    decoder: p2pchat::wire::frames::FrameDecoder,
    /// The other end's answer to our hello.
    their_hello: p2pchat::wire::frames::Hello,
}

impl RawMember {
    async fn join(at: std::net::SocketAddr, id: &str, name: &str) -> Self {
        Self::join_room(at, id, name, "").await
    }

    async fn join_room(at: std::net::SocketAddr, id: &str, name: &str, room: &str) -> Self {
        Self::join_as(at, id, name, room, false).await
    }

    /// `quiet`: our hello says we neither ping nor need pings.
    async fn join_as(at: std::net::SocketAddr, id: &str, name: &str, room: &str, quiet: bool) -> Self {
        use p2pchat::protocol::{MAGIC, PROTOCOL_VERSION};
        use p2pchat::wire::frames::{self, Frame, Hello};
        let mut stream = TcpStream::connect(at).await.unwrap();
        let hello = Hello {
            v: PROTOCOL_VERSION,
            id: id.into(),
            name: Some(name.into()),
            room: room.into(),
            listen_port: None,
            peers: vec![],
            identity: None,
            relay: false,
            quiet,
        };
        stream.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
        let mut magic = vec![0; MAGIC.len()];
        tokio::time::timeout(WAIT, stream.read_exact(&mut magic)).await.unwrap().unwrap();
        assert_eq!(magic, MAGIC);
        let mut decoder = frames::FrameDecoder::new();
        let their_hello = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(Frame::Hello(hello)) = decoder.next_frame().unwrap() {
                    return hello;
                }
                let mut buf = [0; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the link closed before a hello");
                decoder.feed(&buf[..n]);
            }
        })
        .await
        .expect("no hello came");
        Self { stream, decoder, their_hello }
    }

    async fn send(&mut self, frame: &p2pchat::wire::frames::Frame) {
        self.stream.write_all(&p2pchat::wire::frames::encode(frame)).await.unwrap();
    }

    /// The next frame `wanted` accepts, skipping others (pings, history requests).
    async fn next(&mut self, wanted: impl Fn(&p2pchat::wire::frames::Frame) -> bool) -> p2pchat::wire::frames::Frame {
        tokio::time::timeout(WAIT, async {
            loop {
                while let Some(frame) = self.decoder.next_frame().unwrap() {
                    if wanted(&frame) {
                        return frame;
                    }
                }
                let mut buf = [0; 4096];
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the link closed");
                self.decoder.feed(&buf[..n]);
            }
        })
        .await
        .expect("the frame did not come")
    }
}

/// pia and quin, relayed to each other, linked directly: pia says so with a `relay_close` naming
/// quin. The relay stops passing their messages and tells neither. (To see that a message was not
/// passed on without waiting for nothing, pia then asks for quin again: the relay's `relay_open`
/// to quin is queued after anything it passed on before it.)
async fn stop_relaying_when_linked_directly(pia: &mut RawMember, quin: &mut RawMember) {
    use p2pchat::wire::frames::{Chat, Frame};
    let retire = Frame::RelayClose { peer: "quin-session".into(), reason: "linked directly".into(), clean: true };
    pia.send(&retire).await;
    let text = "said after the direct link came up".to_owned();
    pia.send(&Frame::Msg(Chat { id: "m-direct".into(), from: "pia".into(), text, ts: 1, ..Chat::default() })).await;
    pia.send(&Frame::RelayAsk { peer: "quin-session".into(), addr: None }).await;
    let relay_frames = |f: &Frame| matches!(f, Frame::Msg(_) | Frame::RelayOpen { .. } | Frame::RelayClose { .. });
    let next = quin.next(relay_frames).await;
    assert!(matches!(next, Frame::RelayOpen { .. }), "the relay passed on or said more than it should: {next:?}");
    let next = pia.next(relay_frames).await;
    assert!(matches!(next, Frame::RelayOpen { .. }), "pia was told something about quin: {next:?}");
}

/// A member of the tracker's relay that stops reading cannot hold the relay's queue, or its
/// partners' lines, forever: it is dropped, and its partner hears that it is gone.
#[tokio::test]
async fn the_trackers_relay_drops_a_member_that_does_not_read() {
    use p2pchat::wire::frames::{self, Chat, Frame};
    let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    config.relay = true;
    let (tracker, _stop, _task) = start_tracker_with(config).await;
    let _sleeper = RawMember::join(tracker, "sleeper-session", "sleeper").await; // never reads again
    let mut talker = RawMember::join(tracker, "talker-session", "talker").await;
    talker.send(&Frame::RelayAsk { peer: "sleeper-session".into(), addr: None }).await;
    talker.next(|f| matches!(f, Frame::RelayOpen { peer, .. } if peer == "sleeper-session")).await;
    let text = "x".repeat(60_000);
    let dropped = tokio::time::timeout(WAIT * 2, async {
        let mut buf = vec![0u8; 65_536];
        for i in 0u64.. {
            let chat = Chat { id: format!("{i:032x}"), from: "talker".into(), text: text.clone(), ..Chat::default() };
            talker.stream.write_all(&frames::encode(&Frame::Msg(chat))).await.unwrap();
            // What the relay sent meanwhile, without waiting for more.
            while let Ok(n @ 1..) = talker.stream.try_read(&mut buf) {
                talker.decoder.feed(&buf[..n]);
            }
            while let Some(frame) = talker.decoder.next_frame().unwrap() {
                if let Frame::RelayClose { peer, reason, .. } = frame {
                    assert_eq!(peer, "sleeper-session");
                    return reason;
                }
            }
        }
        unreachable!()
    })
    .await
    .expect("the relay never gave up on a member that does not read");
    assert!(dropped.contains("dropped by the relay") || dropped.contains("not reading"), "{dropped}");
}

/// A member that cannot reach another asks a common neighbour to relay: the neighbour tells both
/// ends, passes each new message on once, and says when one end leaves.
#[tokio::test]
async fn a_member_relays_between_two_that_cannot_reach_each_other() {
    use p2pchat::wire::frames::{Chat, Frame};
    let (tracker, _stop) = start_tracker().await;
    let (ana, mut ana_events) = join("ana", tracker).await;
    let mut pia = RawMember::join(ana.listen_addr(), "pia-session", "pia").await;
    let mut quin = RawMember::join(ana.listen_addr(), "quin-session", "quin").await;
    wait_p2pchat_links(&ana, 2).await;

    pia.send(&Frame::RelayAsk { peer: "nobody-session".into(), addr: None }).await;
    let Frame::RelayClose { peer, clean, .. } = pia.next(|f| matches!(f, Frame::RelayClose { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), clean), ("nobody-session", false), "ana is not linked to that one");

    pia.send(&Frame::RelayAsk { peer: "quin-session".into(), addr: None }).await;
    let Frame::RelayOpen { peer, name, .. } = pia.next(|f| matches!(f, Frame::RelayOpen { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), name.as_deref()), ("quin-session", Some("quin")));
    let Frame::RelayOpen { peer, name, .. } = quin.next(|f| matches!(f, Frame::RelayOpen { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), name.as_deref()), ("pia-session", Some("pia")));

    // In an open room nobody checks signatures: one a message carries is dropped, never passed on.
    let (key, sig) = (Some("ab".repeat(32)), Some("cd".repeat(64)));
    let chat = |id: &str, text: &str| {
        Frame::Msg(Chat {
            id: id.into(),
            from: "pia".into(),
            room: String::new(),
            ts: 1,
            hlc: 0,
            text: text.into(),
            key: key.clone(),
            sig: sig.clone(),
        })
    };
    pia.send(&chat("m1", "through ana")).await;
    pia.send(&chat("m1", "through ana")).await; // a replay: passed on (and shown) once
    pia.send(&chat("m2", "second")).await;
    let is_msg = |f: &Frame| matches!(f, Frame::Msg(_));
    let Frame::Msg(first) = quin.next(is_msg).await else { unreachable!() };
    let Frame::Msg(second) = quin.next(is_msg).await else { unreachable!() };
    assert_eq!((first.id.as_str(), first.text.as_str(), second.id.as_str()), ("m1", "through ana", "m2"));
    assert_eq!((first.key.as_ref(), first.sig.as_ref()), (None, None));
    let seen_by_ana = next_message(&mut ana_events).await;
    assert_eq!(
        (seen_by_ana.text.as_str(), seen_by_ana.signed),
        ("through ana", false),
        "the relay sees the room's messages too"
    );
    assert_eq!(next_message(&mut ana_events).await.text, "second");
    // The other way too.
    quin.send(&Frame::Msg(Chat {
        id: "m3".into(),
        from: "quin".into(),
        room: String::new(),
        ts: 1,
        hlc: 0,
        text: "back".into(),
        ..Chat::default()
    }))
    .await;
    let Frame::Msg(back) = pia.next(is_msg).await else { unreachable!() };
    assert_eq!(back.text, "back");

    stop_relaying_when_linked_directly(&mut pia, &mut quin).await;

    quin.send(&Frame::Bye).await;
    drop(quin);
    let Frame::RelayClose { peer, clean, .. } = pia.next(|f| matches!(f, Frame::RelayClose { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), clean), ("quin-session", true), "quin said goodbye");
}

/// With `relay` on, the tracker takes links from members (a hello with a name), lists the members
/// linked to it, and relays between two of them on request; off (the default), it refuses them.
#[tokio::test]
async fn the_tracker_relays_only_when_told_to() {
    use p2pchat::protocol::{MAGIC, PROTOCOL_VERSION};
    use p2pchat::wire::frames::{self, Chat, Frame, Hello};
    let (plain, _stop) = start_tracker().await;
    let mut refused = TcpStream::connect(plain).await.unwrap();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: "pia-session".into(),
        name: Some("pia".into()),
        room: String::new(),
        listen_port: None,
        peers: vec![],
        identity: None,
        relay: false,
        quiet: false,
    };
    refused.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, refused.read_to_end(&mut answer)).await.unwrap().unwrap();
    let mut decoder = frames::FrameDecoder::new();
    decoder.feed(&answer[MAGIC.len()..]);
    let Ok(Some(Frame::Error { message, .. })) = decoder.next_frame() else { panic!("no error frame: {answer:?}") };
    assert!(message.contains("does not relay"), "{message}");

    let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
    config.relay = true;
    let (tracker, _stop, _task) = start_tracker_with(config).await;
    let mut pia = RawMember::join(tracker, "pia-session", "pia").await;
    let mut quin = RawMember::join(tracker, "quin-session", "quin").await;
    let listed: Vec<_> = quin.their_hello.peers.iter().map(|m| m.id.as_deref()).collect();
    assert_eq!(listed, [Some("pia-session")], "the relay lists the members linked to it");

    quin.send(&Frame::RelayAsk { peer: "pia-session".into(), addr: None }).await;
    let Frame::RelayOpen { peer, .. } = quin.next(|f| matches!(f, Frame::RelayOpen { .. })).await else {
        unreachable!()
    };
    assert_eq!(peer, "pia-session");
    let Frame::RelayOpen { peer, name, .. } = pia.next(|f| matches!(f, Frame::RelayOpen { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), name.as_deref()), ("quin-session", Some("quin")));
    quin.send(&Frame::Msg(Chat {
        id: "m1".into(),
        from: "quin".into(),
        room: String::new(),
        ts: 1,
        hlc: 0,
        text: "via the tracker".into(),
        ..Chat::default()
    }))
    .await;
    let Frame::Msg(chat) = pia.next(|f| matches!(f, Frame::Msg(_))).await else { unreachable!() };
    assert_eq!((chat.id.as_str(), chat.text.as_str()), ("m1", "via the tracker"));
    pia.send(&Frame::Msg(Chat {
        id: "m2".into(),
        from: "pia".into(),
        room: String::new(),
        ts: 1,
        hlc: 0,
        text: "and back".into(),
        ..Chat::default()
    }))
    .await;
    let Frame::Msg(chat) = quin.next(|f| matches!(f, Frame::Msg(_))).await else { unreachable!() };
    assert_eq!(chat.text, "and back");

    stop_relaying_when_linked_directly(&mut pia, &mut quin).await;

    pia.send(&Frame::Bye).await;
    drop(pia);
    let Frame::RelayClose { peer, clean, .. } = quin.next(|f| matches!(f, Frame::RelayClose { .. })).await else {
        unreachable!()
    };
    assert_eq!((peer.as_str(), clean), ("pia-session", true));
}

mod private_rooms {
    use super::*;
    use p2pchat::identity::Identity;
    use p2pchat::private::RoomKey;
    use p2pchat::protocol::{MAGIC, PROTOCOL_VERSION};
    use p2pchat::wire::frames::{self, Frame, FrameDecoder, Hello};

    const SECRET: &str = "correct horse battery";

    async fn join_private(name: &str, tracker: std::net::SocketAddr, key: &RoomKey) -> (PeerHandle, Events) {
        let mut config = PeerConfig::new(name, "127.0.0.1", tracker.port());
        config.private = Some(key.clone());
        let (handle, events, _) = peer::join(config).await.unwrap();
        (handle, events)
    }

    /// Two members with the same secret chat; the tracker knows the room only by its opaque id.
    #[tokio::test]
    async fn members_chat_and_the_tracker_knows_only_the_opaque_id() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let bound = Tracker::bind(TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap())).await.unwrap();
        let (tracker, tracker_handle) = (bound.local_addr(), bound.handle());
        let _task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(bound.run(std::future::pending())));
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        let (bob, mut bob_events) = join_private("bob", tracker, &key).await;
        assert_eq!(ana.room(), "plans");
        assert_eq!(tracker_handle.members(&key.room_id()).await.unwrap().len(), 2);
        assert!(tracker_handle.members("plans").await.unwrap().is_empty(), "the tracker never hears the name");
        wait_p2pchat_links(&ana, 1).await;
        bob.send("the plan").await.unwrap();
        let plan = next_message(&mut ana_events).await;
        assert_eq!((plan.text.as_str(), plan.signed), ("the plan", true), "signed by bob, checked by ana");
        ana.send("agreed").await.unwrap();
        assert_eq!(next_message(&mut bob_events).await.text, "agreed");
        // A newcomer gets the conversation from a member, each message with its author's signature.
        let (_carol, mut carol_events) = join_private("carol", tracker, &key).await;
        let mut earlier = Vec::new();
        while earlier.len() < 2 {
            let m = next_message(&mut carol_events).await;
            assert!(m.history, "{m:?}");
            earlier.push((m.sender.unwrap_or_default(), m.text));
        }
        assert_eq!(earlier, [("bob".to_owned(), "the plan".to_owned()), ("ana".to_owned(), "agreed".to_owned())]);
    }

    /// The raw dialler's side of the handshake (the same steps as `peer::secure`, written out here so
    /// the test can bring a wrong key or misbehave afterwards).
    struct RawDialler {
        stream: TcpStream,
        pending: Vec<u8>,
        transport: Option<snow::StatelessTransportState>,
        /// The handshake hash, which identity proofs are bound to.
        binding: Vec<u8>,
    }

    fn record(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        out
    }

    impl RawDialler {
        async fn read_record(&mut self) -> Option<Vec<u8>> {
            loop {
                if self.pending.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([self.pending[0], self.pending[1]]));
                    if self.pending.len() >= 2 + len {
                        let record = self.pending[2..2 + len].to_vec();
                        self.pending.drain(..2 + len);
                        return Some(record);
                    }
                }
                let mut buf = [0u8; 4096];
                let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf)).await.unwrap().unwrap_or(0);
                if n == 0 {
                    return None;
                }
                self.pending.extend_from_slice(&buf[..n]);
            }
        }

        /// Dial `at` for room `room_id` holding `psk`; `transport` is set when the handshake completed.
        async fn handshake(at: std::net::SocketAddr, room_id: &str, psk: &[u8; 32]) -> Self {
            let builder = snow::Builder::new("Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s".parse().unwrap());
            let keypair = builder.generate_keypair().unwrap();
            let mut noise = builder
                .local_private_key(&keypair.private)
                .unwrap()
                .psk(3, psk)
                .unwrap()
                .prologue(
                    &[&b"p2pchat private link v1\0"[..], &PROTOCOL_VERSION.to_be_bytes(), room_id.as_bytes()].concat(),
                )
                .unwrap()
                .build_initiator()
                .unwrap();
            let mut stream = TcpStream::connect(at).await.unwrap();
            let mut message = vec![0u8; 65_535];
            let mut opening = frames::encode_opening(&Frame::SecureHello { v: PROTOCOL_VERSION, room: room_id.into() });
            let n = noise.write_message(&[], &mut message).unwrap();
            opening.extend(record(&message[..n]));
            stream.write_all(&opening).await.unwrap();
            let mut head = vec![0u8; MAGIC.len()];
            tokio::time::timeout(WAIT, stream.read_exact(&mut head)).await.unwrap().unwrap();
            assert_eq!(head, MAGIC);
            let mut this = Self { stream, pending: Vec::new(), transport: None, binding: Vec::new() };
            let mut decoder = FrameDecoder::new();
            let hello = loop {
                if let Some(frame) = decoder.next_frame().unwrap() {
                    break frame;
                }
                let mut buf = [0u8; 4096];
                let n = this.stream.read(&mut buf).await.unwrap();
                decoder.feed(&buf[..n]);
            };
            assert!(matches!(hello, Frame::SecureHello { ref room, .. } if room == room_id), "{hello:?}");
            this.pending = decoder.take_rest();
            let reply = this.read_record().await.expect("the acceptor's handshake message");
            noise.read_message(&reply, &mut message).unwrap();
            let n = noise.write_message(&[], &mut message).unwrap();
            this.stream.write_all(&record(&message[..n])).await.unwrap();
            this.binding = noise.get_handshake_hash().to_vec();
            let transport = noise.into_stateless_transport_mode().unwrap();
            if let Some(ready) = this.read_record().await {
                transport.read_message(0, &ready, &mut message).expect("the acceptor's empty record");
                this.transport = Some(transport);
            }
            this
        }

        fn seal(&self, nonce: u64, plaintext: &[u8]) -> Vec<u8> {
            let mut out = vec![0u8; plaintext.len() + 16];
            let n = self.transport.as_ref().unwrap().write_message(nonce, plaintext, &mut out).unwrap();
            record(&out[..n])
        }
    }

    /// A raw member on a completed private link: frames out and in, each in a record of its own,
    /// with the nonces counted (the acceptor's empty record was its nonce 0).
    struct RawPrivateMember {
        link: RawDialler,
        sent: u64,
        received: u64,
        decoder: FrameDecoder,
        /// The acceptor's plaintext opens with the magic, as every p2pchat stream does.
        opened: bool,
    }

    impl RawPrivateMember {
        /// Link to `at` and say hello as `id` and `name`, proving `identity`.
        async fn join(at: std::net::SocketAddr, key: &RoomKey, identity: &Identity, id: &str, name: &str) -> Self {
            let link = RawDialler::handshake(at, &key.room_id(), key.key()).await;
            assert!(link.transport.is_some(), "the handshake did not complete");
            let hello = raw_hello_as(key, identity, &link.binding, id, name);
            let mut this = Self { link, sent: 0, received: 1, decoder: FrameDecoder::new(), opened: false };
            this.write(&hello).await;
            this
        }

        async fn write(&mut self, plaintext: &[u8]) {
            let sealed = self.link.seal(self.sent, plaintext);
            self.sent += 1;
            self.link.stream.write_all(&sealed).await.unwrap();
        }

        async fn send(&mut self, frame: &Frame) {
            self.write(&frames::encode(frame)).await;
        }

        /// The next frame `wanted` accepts, skipping others.
        async fn next(&mut self, wanted: impl Fn(&Frame) -> bool) -> Frame {
            tokio::time::timeout(WAIT, async {
                loop {
                    while let Some(frame) = self.decoder.next_frame().unwrap() {
                        if wanted(&frame) {
                            return frame;
                        }
                    }
                    let record = self.link.read_record().await.expect("the link closed");
                    let mut plaintext = vec![0u8; record.len()];
                    let transport = self.link.transport.as_ref().unwrap();
                    let n =
                        transport.read_message(self.received, &record, &mut plaintext).expect("a record that opens");
                    self.received += 1;
                    let mut plaintext = &plaintext[..n];
                    if !self.opened {
                        assert!(plaintext.starts_with(MAGIC), "no opening inside the encryption");
                        plaintext = &plaintext[MAGIC.len()..];
                        self.opened = true;
                    }
                    self.decoder.feed(plaintext);
                }
            })
            .await
            .expect("the frame did not come")
        }
    }

    /// A message from `from` in the room of `key`, said now and signed by `identity`.
    fn signed_now(key: &RoomKey, identity: &Identity, from: &str, text: &str) -> p2pchat::wire::frames::Chat {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let mut chat = p2pchat::wire::frames::Chat {
            id: frames::random_id(),
            from: from.into(),
            room: key.room_id(),
            ts: now,
            text: text.into(),
            ..Default::default()
        };
        identity.sign_chat(&mut chat);
        chat
    }

    /// The hello inside the encryption names the room by its id, like everything on the wire, and
    /// carries an identity proof (made for `binding`).
    fn raw_hello(key: &RoomKey, identity: &Identity, binding: &[u8]) -> Vec<u8> {
        raw_hello_as(key, identity, binding, &frames::random_id(), "raw")
    }

    fn raw_hello_as(key: &RoomKey, identity: &Identity, binding: &[u8], id: &str, name: &str) -> Vec<u8> {
        let hello = Hello {
            v: PROTOCOL_VERSION,
            id: id.into(),
            name: Some(name.into()),
            room: key.room_id(),
            listen_port: None,
            peers: vec![],
            identity: Some(identity.prove(binding)),
            relay: false,
            quiet: false,
        };
        frames::encode_opening(&Frame::Hello(hello))
    }

    async fn next_notice(events: &mut Events) -> String {
        loop {
            match tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap() {
                Event::Notice { text } => return text,
                _ => continue,
            }
        }
    }

    /// Someone who knows the room's id (the tracker does) but not its key cannot open a link: the
    /// handshake fails, the member says so, and nothing reaches either side.
    #[tokio::test]
    async fn the_room_id_without_the_key_fails_the_handshake() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        let mallory = RawDialler::handshake(ana.listen_addr(), &key.room_id(), &[7u8; 32]).await;
        assert!(mallory.transport.is_none(), "the handshake must not complete without the key");
        let notice = next_notice(&mut ana_events).await;
        assert!(notice.contains("does not hold this room's key"), "{notice}");
        assert!(ana.peers().await.unwrap().is_empty());
    }

    /// With the key, a record that was altered, or sent again, closes the link.
    #[tokio::test]
    async fn an_altered_or_replayed_record_closes_the_link() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        for misbehave in ["alter", "replay"] {
            let mut raw = RawDialler::handshake(ana.listen_addr(), &key.room_id(), key.key()).await;
            let hello = raw.seal(0, &raw_hello(&key, &Identity::generate().unwrap(), &raw.binding));
            raw.stream.write_all(&hello).await.unwrap();
            loop {
                match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
                    Event::Joined { name, .. } => {
                        assert_eq!(name.as_deref(), Some("raw"));
                        break;
                    }
                    _ => continue,
                }
            }
            let ping = frames::encode(&Frame::Ping);
            let bad = match misbehave {
                "alter" => {
                    let mut sealed = raw.seal(1, &ping);
                    let last = sealed.len() - 1;
                    sealed[last] ^= 1;
                    sealed
                }
                _ => hello.clone(),
            };
            raw.stream.write_all(&bad).await.unwrap();
            loop {
                match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
                    Event::Left { name, clean, .. } => {
                        assert_eq!((name.as_deref(), clean), (Some("raw"), false), "{misbehave}");
                        break;
                    }
                    _ => continue,
                }
            }
        }
    }

    /// A hello whose identity proof was made for another link (copied, or absent) is refused.
    #[tokio::test]
    async fn an_identity_proof_for_another_link_is_refused() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        let mut raw = RawDialler::handshake(ana.listen_addr(), &key.room_id(), key.key()).await;
        let copied = raw_hello(&key, &Identity::generate().unwrap(), b"the hash of some other link");
        let sealed = raw.seal(0, &copied);
        raw.stream.write_all(&sealed).await.unwrap();
        let notice = next_notice(&mut ana_events).await;
        assert!(notice.contains("gave no valid identity: its signature does not verify"), "{notice}");
        assert!(ana.peers().await.unwrap().is_empty());
    }

    /// A name met with one key, then claimed with another, is flagged (trust on first use); the
    /// member list and the join event show the proven key.
    #[tokio::test]
    async fn a_second_key_claiming_a_known_name_is_flagged() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let dir = std::env::temp_dir().join(format!("p2pchat-tofu-{}", frames::random_id()));
        let mut ana_config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        ana_config.private = Some(key.clone());
        ana_config.identity = Some(dir.join("ana").join("identity.json"));
        let (ana, mut ana_events, _) = peer::join(ana_config).await.unwrap();
        let (mut fingerprints, mut notices) = (Vec::new(), Vec::new());
        for attempt in ["bob", "someone else calling themselves bob"] {
            let mut bob_config = PeerConfig::new("bob", "127.0.0.1", tracker.port());
            bob_config.private = Some(key.clone());
            bob_config.identity = Some(dir.join(attempt).join("identity.json"));
            let (bob, _bob_events, _) = peer::join(bob_config).await.unwrap();
            let (fingerprint, key_changed) = loop {
                match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
                    Event::Joined { name, encrypted, fingerprint, key_changed, .. } => {
                        assert_eq!((name.as_deref(), encrypted), (Some("bob"), true));
                        break (fingerprint.expect("a proven key"), key_changed);
                    }
                    Event::Notice { text } => notices.push(text),
                    _ => continue,
                }
            };
            assert_eq!(fingerprint, bob.fingerprint(), "the key bob proved is bob's");
            let listed = ana.peers().await.unwrap();
            assert_eq!(
                (listed[0].fingerprint.as_deref(), listed[0].key_changed),
                (Some(fingerprint.as_str()), key_changed)
            );
            fingerprints.push((fingerprint, key_changed));
            bob.close().await;
        }
        assert!(!fingerprints[0].1, "the first key of a name is trusted");
        assert!(fingerprints[1].1, "another key for the same name is flagged");
        assert_ne!(fingerprints[0].0, fingerprints[1].0);
        let warnings: Vec<&String> = notices.iter().filter(|n| n.starts_with("WARNING: bob")).collect();
        assert_eq!(warnings.len(), 1, "{notices:?}");
        assert!(warnings[0].contains(&fingerprints[0].0) && warnings[0].contains(&fingerprints[1].0), "{warnings:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Every message must be its author's: unsigned, altered, re-signed and stale ones are dropped,
    /// and the user told; a second copy under the same id is shown once.
    /// Connections that start a private room's handshake and never finish it count against the link
    /// limit: past it, the next connection is reset at once, before anyone is authenticated.
    #[tokio::test]
    async fn handshakes_in_flight_count_against_the_link_limit() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.private = Some(key.clone());
        config.limits.max_links = 2;
        let (ana, _ana_events, _) = peer::join(config).await.unwrap();
        let mut stalled = Vec::new();
        for _ in 0..2 {
            stalled.push(TcpStream::connect(ana.listen_addr()).await.unwrap());
        }
        // The peer accepts connections in the order they came: these two are in their handshakes
        // (waiting for an opening that never comes) when the third is accepted.
        let mut third = TcpStream::connect(ana.listen_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, third.read(&mut buf)).await.expect("the third connection was not held");
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "reset, not handed to a handshake"
        );
        drop(stalled);
    }

    /// A message captured on the way (here, re-sent by its author's end as it was) is not shown
    /// again after its receiver restarts, within the 10 minutes it counts as fresh: the ids the
    /// receiver's log holds are seen from the start.
    #[tokio::test]
    async fn a_message_replayed_after_a_restart_is_not_shown_again() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let dir = std::env::temp_dir().join(format!("p2pchat-replay-{}", frames::random_id()));
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.private = Some(key.clone());
        config.identity = Some(dir.join("identity.json"));
        config.history.location = p2pchat::history::store::Location::Dir(dir.clone());
        let raw_identity = Identity::generate().unwrap();
        let signed = |text: &str| signed_now(&key, &raw_identity, "raw", text);
        let captured = signed("said once");
        for (run, after) in [(1, None), (2, Some(signed("after the replay")))] {
            let (ana, mut ana_events, _) = peer::join(config.clone()).await.unwrap();
            let mut raw = RawDialler::handshake(ana.listen_addr(), &key.room_id(), key.key()).await;
            let hello = raw.seal(0, &raw_hello(&key, &raw_identity, &raw.binding));
            raw.stream.write_all(&hello).await.unwrap();
            wait_p2pchat_links(&ana, 1).await;
            let mut nonce = 1..;
            for chat in std::iter::once(captured.clone()).chain(after) {
                let record = raw.seal(nonce.next().unwrap(), &frames::encode(&Frame::Msg(chat)));
                raw.stream.write_all(&record).await.unwrap();
            }
            let expected = if run == 1 { "said once" } else { "after the replay" };
            assert_eq!(next_message(&mut ana_events).await.text, expected, "run {run}");
            ana.close().await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn only_messages_signed_by_their_author_are_shown() {
        use p2pchat::wire::frames::Chat;
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        let (_bob, _bob_events) = join_private("bob", tracker, &key).await;
        wait_p2pchat_links(&ana, 1).await;
        let raw_identity = Identity::generate().unwrap();
        let mut raw = RawDialler::handshake(ana.listen_addr(), &key.room_id(), key.key()).await;
        let hello = raw.seal(0, &raw_hello(&key, &raw_identity, &raw.binding));
        raw.stream.write_all(&hello).await.unwrap();
        wait_p2pchat_links(&ana, 2).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let signed = |text: &str, from: &str, ts: u64| {
            let mut chat = Chat {
                id: frames::random_id(),
                from: from.into(),
                room: key.room_id(),
                ts,
                hlc: 0,
                text: text.into(),
                ..Chat::default()
            };
            raw_identity.sign_chat(&mut chat);
            chat
        };
        let genuine = signed("genuine", "raw", now);
        let unsigned = Chat { key: None, sig: None, ..signed("unsigned", "raw", now) };
        let altered = Chat { text: "altered".into(), ..signed("as written", "raw", now) };
        let sent = [
            genuine.clone(),
            unsigned,
            altered,
            signed("i am bob", "bob", now),
            signed("old news", "raw", now - 3_600_000),
            genuine,
            signed("the end", "raw", now),
        ];
        for (nonce, chat) in (1..).zip(sent) {
            let record = raw.seal(nonce, &frames::encode(&Frame::Msg(chat)));
            raw.stream.write_all(&record).await.unwrap();
        }
        let (mut shown, mut notices) = (Vec::new(), Vec::new());
        while shown.last().map(String::as_str) != Some("the end") {
            match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
                Event::Message(m) => shown.push(m.text),
                Event::Notice { text } => notices.push(text),
                _ => {}
            }
        }
        assert_eq!(shown, ["genuine", "the end"]);
        let reasons =
            ["carries no signature", "signature does not verify", "signed again by someone else", "(a replay?)"];
        assert_eq!(notices.len(), reasons.len(), "{notices:?}");
        for (notice, reason) in notices.iter().zip(reasons) {
            assert!(notice.starts_with("dropped a message") && notice.contains(reason), "{notice} / {reason}");
        }
        // A link that keeps bringing forgeries cannot fill the screen: five are told, the rest logged.
        for nonce in 8..15 {
            let record = raw.seal(
                nonce,
                &frames::encode(&Frame::Msg(Chat { key: None, sig: None, ..signed("forged", "raw", now) })),
            );
            raw.stream.write_all(&record).await.unwrap();
        }
        raw.stream
            .write_all(&raw.seal(15, &frames::encode(&Frame::Msg(signed("after them", "raw", now)))))
            .await
            .unwrap();
        let mut more = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap() {
                Event::Message(m) if m.text == "after them" => break,
                Event::Notice { text } => more.push(text),
                _ => {}
            }
        }
        assert_eq!(more.len(), 2, "{more:?}");
        assert!(more[1].starts_with("more messages dropped from") && more[1].ends_with("are only logged"), "{more:?}");
    }

    /// Register a member of room `room` at `tracker` that listens nowhere (nobody can reach it); its
    /// registration lasts as long as the returned connection.
    async fn register_ghost(tracker: std::net::SocketAddr, room: &str) -> TcpStream {
        let ghost = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ghost_addr = ghost.local_addr().unwrap();
        drop(ghost);
        let mut registration = p2pchat::net::connect_from(ghost_addr, tracker).await.unwrap();
        let hello = Hello {
            v: PROTOCOL_VERSION,
            id: "ghost".into(),
            name: None,
            room: room.into(),
            listen_port: Some(ghost_addr.port()),
            peers: vec![],
            identity: None,
            relay: false,
            quiet: false,
        };
        registration.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.unwrap();
        let mut welcome = [0u8; 512];
        let _ = tokio::time::timeout(WAIT, registration.read(&mut welcome)).await.unwrap().unwrap();
        registration
    }

    /// A stranger who knows a private room's id (it travels in clear) but not its key joins the
    /// tracker's relay, and a member that can reach nobody links to it. Whatever the stranger sends
    /// there without the key (a plain message signed by its own key, a name through `relay_open`, a
    /// `nick`) shows nothing, pins no name and lists nobody: only sealed content counts on a link
    /// that never ran the handshake.
    #[tokio::test]
    async fn a_stranger_at_the_trackers_relay_cannot_post_name_or_pin_in_a_private_room() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
        config.relay = true;
        let (tracker, _stop, _task) = start_tracker_with(config).await;
        // A member nobody can reach, so that ana links to the relay.
        let _ghost = register_ghost(tracker, &key.room_id()).await;
        // On the relay: mallory, who only knows the room id, and quin, a member holding the key.
        let mut mallory = RawMember::join_room(tracker, "mallory-session", "mallory", &key.room_id()).await;
        let mut quin = RawMember::join_room(tracker, "quin-session", "quin", &key.room_id()).await;
        let dir = std::env::temp_dir().join(format!("p2pchat-stranger-{}", frames::random_id()));
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.private = Some(key.clone());
        config.identity = Some(dir.join("ana").join("identity.json"));
        config.limits.retry_refused_for = Duration::from_millis(300);
        config.limits.relay_after = Duration::from_millis(100);
        config.limits.keepalive_interval = Duration::from_millis(200);
        let (ana, mut ana_events, _) = peer::join(config).await.unwrap();
        // Ana reaches both through the relay; quin has mallory relayed too, so what the relay passes
        // on from mallory reaches quin, and then ana, before anything quin sends after it.
        mallory.next(|f| matches!(f, Frame::RelayOpen { .. })).await;
        quin.next(|f| matches!(f, Frame::RelayOpen { .. })).await;
        quin.send(&Frame::RelayAsk { peer: "mallory-session".into(), addr: None }).await;
        quin.next(|f| matches!(f, Frame::RelayOpen { peer, .. } if peer == "mallory-session")).await;
        let mallory_identity = Identity::generate().unwrap();
        let forged = signed_now(&key, &mallory_identity, "mallory", "posted without the key");
        mallory.send(&Frame::Msg(forged)).await;
        mallory.send(&Frame::Nick { name: "mallory2".into() }).await;
        quin.next(|f| matches!(f, Frame::Msg(m) if m.text == "posted without the key")).await;
        quin.next(|f| matches!(f, Frame::RelayOpen { name, .. } if name.as_deref() == Some("mallory2"))).await;
        // Then quin, a member, says something sealed: the end of what ana could have shown.
        let quin_identity = Identity::generate().unwrap();
        let reply = signed_now(&key, &quin_identity, "quin", "sealed and signed");
        quin.send(&key.seal(&reply)).await;
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout(WAIT, ana_events.recv()).await.unwrap().unwrap();
            match event {
                Event::Message(m) if m.text == "sealed and signed" => break,
                other => seen.push(format!("{other:?}")),
            }
        }
        let mallory_seen: Vec<&String> = seen.iter().filter(|e| e.contains("mallory")).collect();
        assert!(mallory_seen.is_empty(), "ana showed what a stranger sent: {mallory_seen:?}");
        let named: Vec<_> = ana.peers().await.unwrap().into_iter().filter(|p| p.name.is_some()).collect();
        assert!(named.is_empty(), "names came from the tracker's relay: {named:?}");
        ana.close().await;
        let pins = std::fs::read_to_string(dir.join("ana").join("known_keys.json")).unwrap_or_default();
        assert!(!pins.contains("mallory"), "a stranger's key was pinned: {pins}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A member relaying in a private room passes each message on as it came, sealed: the same
    /// `sealed` frame (id, nonce and ciphertext), never opened and sealed again, so its author's
    /// signature and seal reach the other end untouched.
    #[tokio::test]
    async fn a_member_relays_a_private_rooms_messages_sealed_and_unchanged() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let (tracker, _stop) = start_tracker().await;
        let (ana, mut ana_events) = join_private("ana", tracker, &key).await;
        let pia_identity = Identity::generate().unwrap();
        let mut pia = RawPrivateMember::join(ana.listen_addr(), &key, &pia_identity, "pia-session", "pia").await;
        let mut quin =
            RawPrivateMember::join(ana.listen_addr(), &key, &Identity::generate().unwrap(), "quin-session", "quin")
                .await;
        wait_connections(&ana, 2).await;
        pia.send(&Frame::RelayAsk { peer: "quin-session".into(), addr: None }).await;
        assert!(
            matches!(pia.next(|f| matches!(f, Frame::RelayOpen { .. })).await, Frame::RelayOpen { peer, .. } if peer == "quin-session")
        );
        assert!(
            matches!(quin.next(|f| matches!(f, Frame::RelayOpen { .. })).await, Frame::RelayOpen { peer, .. } if peer == "pia-session")
        );

        let chat = signed_now(&key, &pia_identity, "pia", "for quin, through ana");
        let sealed = key.seal(&chat);
        pia.send(&sealed).await;
        let passed = quin.next(|f| matches!(f, Frame::Sealed { .. } | Frame::Msg(_))).await;
        assert_eq!(passed, sealed, "the relay passed on something else than what pia sealed");
        // Ana is a member: she shows it, checked against the key pia proved on her link.
        let shown = next_message(&mut ana_events).await;
        assert_eq!((shown.text.as_str(), shown.signed), ("for quin, through ana", true));
    }

    /// A member that can reach nobody goes through the tracker's relay (`--relay`); in a private room
    /// the tracker passes on only sealed messages and never learns a name.
    #[tokio::test]
    async fn the_trackers_relay_carries_a_private_room_sealed() {
        let key = RoomKey::from_secret("plans", SECRET).unwrap();
        let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
        config.relay = true;
        let (tracker, _stop, _task) = start_tracker_with(config).await;
        // A member of the room nobody can reach (it registered, but listens nowhere)...
        let _ghost = register_ghost(tracker, &key.room_id()).await;
        // ... and one on the relay already (a raw member holding the key).
        let mut quin = RawMember::join_room(tracker, "quin-session", "quin", &key.room_id()).await;
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.private = Some(key.clone());
        config.limits.retry_refused_for = Duration::from_millis(300);
        config.limits.relay_after = Duration::from_millis(100);
        config.limits.keepalive_interval = Duration::from_millis(200);
        let (ana, mut ana_events, _) = peer::join(config).await.unwrap();
        // Ana fails to reach the ghost, links to the relay, hears of quin there and asks for it.
        let Frame::RelayOpen { peer: ana_session, name, .. } =
            quin.next(|f| matches!(f, Frame::RelayOpen { .. })).await
        else {
            unreachable!()
        };
        // What reached the relay of ana, passed on as the relay knows it: no name.
        assert_eq!(name, None, "the tracker's relay learnt ana's name");
        ana.send("the secret plan").await.unwrap();
        let Frame::Sealed { id, data } =
            quin.next(|f| matches!(f, Frame::Sealed { .. } | Frame::Msg(_) | Frame::Nick { .. })).await
        else {
            panic!("the tracker passed on something unsealed")
        };
        assert!(!data.contains(&hex::encode(b"secret")), "sealed");
        let opened = key.open_sealed(&id, &data).unwrap();
        assert_eq!((opened.from.as_str(), opened.text.as_str()), ("ana", "the secret plan"), "a member opens it");
        assert!(p2pchat::identity::verify_chat(&opened).is_ok(), "and it is signed by ana");
        // Quin answers, sealed and signed.
        let quin_identity = Identity::generate().unwrap();
        let reply = signed_now(&key, &quin_identity, "quin", "count me in");
        quin.send(&key.seal(&reply)).await;
        let m = next_message(&mut ana_events).await;
        // Signed, and checked, but by a key quin never proved to ana on a link: not shown as verified.
        assert_eq!((m.sender.as_deref(), m.text.as_str(), m.signed), (Some("quin"), "count me in", false));
        // Who the tracker says it relays is the tracker's word only: a private room lists nobody
        // from it (see the stranger test above); quin's messages, sealed, still come.
        let relayed: Vec<_> =
            ana.peers().await.unwrap().into_iter().filter(|p| p.relayed_by == Some(tracker)).collect();
        assert!(relayed.is_empty(), "the tracker named members to ana ({ana_session}): {relayed:?}");
        ana.nick("anastasia").await.unwrap();
        ana.send("after the rename").await.unwrap();
        assert!(
            matches!(quin.next(|f| matches!(f, Frame::Sealed { .. } | Frame::Nick { .. })).await, Frame::Sealed { .. }),
            "no name to the tracker"
        );
    }
}

#[tokio::test]
async fn posted_lines_wait_for_no_reply_and_keep_their_order_with_sent_ones() {
    let (tracker, _stop) = start_tracker().await;
    let (a, mut a_events) = join("ana", tracker).await;
    let (b, _b_events) = join("bob", tracker).await;
    wait_connections(&a, 1).await;
    wait_connections(&b, 1).await;
    // Nothing else runs on this test's one thread until it waits: posts fill the command queue.
    let mut queued = 0;
    while b.try_post(&format!("line {queued}")).unwrap() {
        queued += 1;
    }
    assert_eq!(queued, peer::COMMAND_QUEUE);
    b.post(&format!("line {queued}")).await.unwrap(); // waits for room
    assert_eq!(b.send("last").await.unwrap(), 1);
    for i in 0..=queued {
        assert_eq!(next_message(&mut a_events).await.text, format!("line {i}"));
    }
    assert_eq!(next_message(&mut a_events).await.text, "last");
    assert!(matches!(b.post("two\nlines").await, Err(peer::PeerError::InvalidInput(_))));
    b.close().await;
    assert!(matches!(b.post("after close").await, Err(peer::PeerError::Closed)));
    assert!(matches!(b.try_post("after close"), Err(peer::PeerError::Closed)));
}

/// Limits and refusals, seen from the wire: what a stranger's connection gets at each cap.
mod limits {
    use super::*;
    use p2pchat::protocol::{MAGIC, PROTOCOL_VERSION};
    use p2pchat::wire::frames::{self, Frame, FrameDecoder, Hello};

    /// A p2pchat hello from a member in `room` listening on `port`; a tracker takes one without a
    /// name as a registration (a named one is for its relay).
    fn hello(room: &str, port: u16, name: Option<&str>) -> Vec<u8> {
        let hello = Hello {
            v: PROTOCOL_VERSION,
            id: format!("stranger-{port}"),
            name: name.map(str::to_owned),
            room: room.into(),
            listen_port: Some(port),
            peers: vec![],
            identity: None,
            relay: false,
            quiet: true,
        };
        frames::encode_opening(&Frame::Hello(hello))
    }

    /// Read what the other end says until it closes: the frames after its opening.
    async fn everything_until_closed(stream: &mut TcpStream) -> Vec<Frame> {
        let mut bytes = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut bytes)).await.expect("still open").expect("read failed");
        assert!(bytes.starts_with(MAGIC), "no p2pchat opening: {bytes:?}");
        let mut decoder = FrameDecoder::new();
        decoder.feed(&bytes[MAGIC.len()..]);
        std::iter::from_fn(|| decoder.next_frame().unwrap()).collect()
    }

    /// How a new connection to `addr` ends, saying nothing: Ok(()) for a clean close, the error kind
    /// for a reset (which may come before the connect returns).
    async fn connect_and_end(addr: std::net::SocketAddr) -> Result<(), std::io::ErrorKind> {
        match TcpStream::connect(addr).await {
            Ok(mut stream) => end_of(&mut stream).await,
            Err(err) => Err(err.kind()),
        }
    }

    /// How a connection ended: Ok(()) for a clean close, the error kind for a reset.
    async fn end_of(stream: &mut TcpStream) -> Result<(), std::io::ErrorKind> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("the connection was held open") {
            Ok(0) => Ok(()),
            Ok(n) => panic!("got {n} bytes instead of the end"),
            Err(err) => Err(err.kind()),
        }
    }

    /// Past `max_links`, the next connection is reset at once; when a link ends its slot is free
    /// again, and the next member is served.
    #[tokio::test]
    async fn past_the_link_limit_a_connection_is_reset_until_a_link_ends() {
        let (tracker, _stop) = start_tracker().await;
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.limits.max_links = 2;
        let (ana, _events, _) = peer::join(config).await.unwrap();
        let first = RawMember::join(ana.listen_addr(), "m1", "one").await;
        let _second = RawMember::join(ana.listen_addr(), "m2", "two").await;
        let third = connect_and_end(ana.listen_addr()).await;
        assert_eq!(third, Err(std::io::ErrorKind::ConnectionReset), "the third link was not reset");
        drop(first);
        tokio::time::timeout(WAIT, async {
            while ana.peers().await.unwrap().len() > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the closed link was never let go");
        let again = RawMember::join(ana.listen_addr(), "m3", "three").await;
        assert_eq!(again.their_hello.name.as_deref(), Some("ana"), "a freed slot serves the next member");
    }

    /// Past `max_registrations`, the tracker resets a registration without a welcome; when one
    /// ends, the next is taken.
    #[tokio::test]
    async fn past_the_registration_cap_the_tracker_resets_until_one_ends() {
        let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
        config.max_registrations = 2;
        let tracker = Tracker::bind(config).await.unwrap();
        let (addr, handle) = (tracker.local_addr(), tracker.handle());
        tokio::spawn(tracker.run(std::future::pending()));
        // Each from a port of its own: a registration from an address already listed replaces it.
        let register = |port: u16| async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(&hello("", port, None)).await.unwrap();
            stream
        };
        let first = register(1).await;
        let _second = register(2).await;
        wait_members(&handle, 2).await;
        let mut third = register(3).await;
        assert_eq!(end_of(&mut third).await, Err(std::io::ErrorKind::ConnectionReset), "no reset past the cap");
        assert_eq!(handle.members("").await.unwrap().len(), 2);
        drop(first);
        wait_members(&handle, 1).await;
        let _fourth = register(4).await;
        wait_members(&handle, 2).await;
    }

    /// Past `max_connections` (answers in progress), the next connection is reset at once; when a
    /// slot frees, the next one is served.
    #[tokio::test]
    async fn past_the_answer_cap_a_connection_is_reset_until_a_slot_frees() {
        let mut config = TrackerConfig::listening_on("127.0.0.1:0".parse().unwrap());
        config.max_connections = 1;
        config.answer_after = Duration::from_secs(30);
        let (addr, _stop, _task) = start_tracker_with(config).await;
        // The first holds the only slot: it sent part of the p2pchat magic, so the tracker waits for
        // the rest (up to answer_after) before it can tell what it is.
        let mut holder = TcpStream::connect(addr).await.unwrap();
        holder.write_all(&MAGIC[..4]).await.unwrap();
        assert_eq!(connect_and_end(addr).await, Err(std::io::ErrorKind::ConnectionReset), "no reset past the cap");
        drop(holder);
        // The holder's connection ended; its slot frees as the tracker reads that end. Until then a
        // newcomer may still be reset: try again, each try bounded.
        let served = tokio::time::timeout(WAIT, async {
            loop {
                let Ok(mut next) = TcpStream::connect(addr).await else { continue };
                let mut magic = vec![0; MAGIC.len()];
                if next.write_all(&hello("", 2, None)).await.is_ok() && next.read_exact(&mut magic).await.is_ok() {
                    return magic;
                }
            }
        })
        .await
        .expect("never served once the slot was free");
        assert_eq!(served, MAGIC);
    }

    /// A p2pchat member of another room is told so with the `room` code, and closed; nobody is
    /// shown joining.
    #[tokio::test]
    async fn a_member_of_another_room_is_refused_with_the_room_code() {
        let (tracker, _stop) = start_tracker().await;
        let (ana, _events) = join_room("ana", tracker, "red").await;
        let mut blue = TcpStream::connect(ana.listen_addr()).await.unwrap();
        blue.write_all(&hello("blue", 1, Some("blue"))).await.unwrap();
        let frames = everything_until_closed(&mut blue).await;
        assert!(
            matches!(frames.as_slice(), [Frame::Error { code, .. }] if code == frames::ERR_ROOM),
            "expected only a `room` error, got {frames:?}"
        );
        assert!(ana.peers().await.unwrap().is_empty());
    }

    /// A peer of an open room dialling a member of a private one gets the `room` code (private
    /// links are encrypted only), and nothing of the room.
    #[tokio::test]
    async fn an_open_room_peer_dialling_a_private_one_is_refused_with_the_room_code() {
        let (tracker, _stop) = start_tracker().await;
        let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
        config.private = Some(p2pchat::private::RoomKey::from_secret("plans", "correct horse battery").unwrap());
        let (ana, _events, _) = peer::join(config).await.unwrap();
        let mut open = TcpStream::connect(ana.listen_addr()).await.unwrap();
        open.write_all(&hello("", 1, Some("open"))).await.unwrap();
        let frames = everything_until_closed(&mut open).await;
        match frames.as_slice() {
            [Frame::Error { code, message }] => {
                assert_eq!(code, frames::ERR_ROOM);
                assert!(message.contains("encrypted links only"), "{message}");
            }
            other => panic!("expected only a `room` error, got {other:?}"),
        }
        assert!(ana.peers().await.unwrap().is_empty());
    }
}

/// A line is in the log (what `history` reads) by the time `send` returns: a caller that asks for
/// the history right after it sent finds its line there, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_right_after_send_holds_the_line() {
    let (tracker, _stop) = start_tracker().await;
    let mut config = PeerConfig::new("ana", "127.0.0.1", tracker.port());
    config.history.location = p2pchat::history::store::Location::Memory;
    let (ana, _events, _) = peer::join(config).await.unwrap();
    for i in 0..2000 {
        let text = format!("line {i}");
        ana.send(&text).await.unwrap();
        let newest = ana.history(1, None).await.unwrap();
        assert_eq!(newest.last().map(|r| r.text.as_str()), Some(text.as_str()), "after {i} sends");
    }
}
