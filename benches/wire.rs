//! `cargo bench`: the Rust hot paths of p2pchat, each beside a baseline measured in the same process.
//!
//! * a join into a room of 10,000 and its leave at the tracker's registry (the welcome shares the
//!   registry's encoded blocks), against serializing the room's member list per join (what the tracker
//!   did first);
//! * decoding that welcome as a newcomer does, against the same room written as JSON objects;
//! * decoding a busy link's reads: 64 KiB of small chat frames, and 64 KiB of original `<NAME> :: text`
//!   lines (against a plain copy of the same bytes, the least any reader does);
//! * the original tracker list: encoding the 1,400-byte answer and parsing a long one.
//!
//! Each figure is the median of 31 timed batches. Without `--bench` (as `cargo test --benches` runs it)
//! every case runs once, to show it still works.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use p2pchat::protocol::PROTOCOL_VERSION;
use p2pchat::tracker::Registry;
use p2pchat::wire::chat::{encode_line, ChatDecoder};
use p2pchat::wire::frames::{self, Chat, Frame, FrameDecoder, Member, Offers};
use p2pchat::wire::peer_list;

struct Bencher {
    timed: bool,
}

impl Bencher {
    /// Median nanoseconds per call of `f`.
    fn median_ns(&self, mut f: impl FnMut()) -> f64 {
        if !self.timed {
            f();
            return 0.0;
        }
        let mut per_call = Vec::new();
        // Size a batch to about 2 ms so the clock's resolution does not matter.
        let started = Instant::now();
        f();
        let once = started.elapsed().as_nanos().max(1) as f64;
        let batch = ((2e6 / once) as usize).clamp(1, 100_000);
        for _ in 0..31 {
            let started = Instant::now();
            for _ in 0..batch {
                f();
            }
            per_call.push(started.elapsed().as_nanos() as f64 / batch as f64);
        }
        per_call.sort_by(f64::total_cmp);
        per_call[per_call.len() / 2]
    }

    fn compare(&self, name: &str, ours: impl FnMut(), baseline_name: &str, baseline: impl FnMut()) {
        let (a, b) = (self.median_ns(ours), self.median_ns(baseline));
        if self.timed {
            println!("{name:<44} {:>12.1} µs   {baseline_name:<34} {:>12.1} µs   ratio {:.3}", a / 1e3, b / 1e3, a / b);
        }
    }
}

fn members(n: u32) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            addr: format!("10.{}.{}.{}:{}", i >> 16, (i >> 8) & 255, i & 255, 40_000 + i % 20_000),
            p2pchat: i % 3 != 0,
            id: None,
        })
        .collect()
}

fn main() {
    let bench = Bencher { timed: std::env::args().any(|a| a == "--bench") };
    if bench.timed {
        println!("{:<44} {:>15}   {:<34} {:>15}", "case", "median", "baseline (same process)", "median");
    }

    let room = members(10_000);
    let mut registry = Registry::new(16_384, peer_list::LEGACY_LIST_BUDGET);
    for member in &room {
        registry.register("", member.addr.parse().expect("a valid address"), Offers::default());
    }
    let newcomer: SocketAddr = "10.200.0.1:5000".parse().expect("a valid address");
    bench.compare(
        "join + leave, room of 10,000 (shared blocks)",
        || {
            let (welcome, token) = registry.register("", newcomer, Offers::default());
            black_box(welcome);
            registry.deregister("", newcomer, token);
        },
        "serialize Vec<Member> per join",
        || {
            let members = room.clone();
            black_box(frames::encode_opening(&Frame::Welcome {
                v: PROTOCOL_VERSION,
                members,
                you: "10.0.0.1:5000".into(),
                relay: false,
                quiet: false,
            }));
        },
    );

    // What a newcomer reads: the welcome as the tracker writes it (a p2pchat member is its address
    // string) against the same room written as objects (as every member was before).
    let (welcome, token) = registry.register("", newcomer, Offers::default());
    let compact: Vec<u8> =
        welcome.slices().iter().flat_map(|s| s.iter().copied()).skip(p2pchat::protocol::MAGIC.len()).collect();
    registry.deregister("", newcomer, token);
    let as_objects = frames::encode(&Frame::Welcome {
        v: PROTOCOL_VERSION,
        members: room.clone(),
        you: "10.0.0.1:5000".into(),
        relay: false,
        quiet: false,
    });
    let decode_welcome = |bytes: &[u8]| {
        let mut d = FrameDecoder::with_limit(frames::MAX_WELCOME_BYTES);
        d.feed(bytes);
        match d.next_frame() {
            Ok(Some(Frame::Welcome { members, .. })) => black_box(members.len()),
            other => panic!("not a welcome: {other:?}"),
        }
    };
    bench.compare(
        &format!("decode a welcome of 10,000 ({} KB)", compact.len() / 1000),
        || {
            decode_welcome(&compact);
        },
        &format!("the same as objects ({} KB)", as_objects.len() / 1000),
        || {
            decode_welcome(&as_objects);
        },
    );

    let chat = |i: usize| {
        Frame::Msg(Chat {
            id: frames::random_id(),
            from: "n7".into(),
            room: String::new(),
            ts: 1,
            hlc: 1 << 16,
            text: format!("7:{i}:123456789."),
            ..Chat::default()
        })
    };
    let mut framed = Vec::new();
    for i in 0.. {
        if framed.len() > 64 * 1024 {
            break;
        }
        framed.extend(frames::encode(&chat(i)));
    }
    let frame_count = {
        let mut d = FrameDecoder::new();
        d.feed(&framed);
        std::iter::from_fn(|| d.next_frame().ok().flatten()).count()
    };
    bench.compare(
        &format!("decode 64 KiB of chat frames ({frame_count})"),
        || {
            let mut d = FrameDecoder::new();
            d.feed(&framed);
            while let Ok(Some(frame)) = d.next_frame() {
                black_box(frame);
            }
        },
        "copy the same bytes",
        || {
            black_box(framed.to_vec());
        },
    );

    let mut lines = Vec::new();
    for i in 0.. {
        if lines.len() > 64 * 1024 {
            break;
        }
        lines.extend(encode_line("n7", &format!("7:{i}:123456789.")));
    }
    bench.compare(
        "decode 64 KiB of original lines",
        || {
            let mut d = ChatDecoder::new();
            black_box(d.feed(&lines));
        },
        "copy the same bytes",
        || {
            black_box(lines.to_vec());
        },
    );

    let addrs: Vec<SocketAddr> = room.iter().filter_map(|m| m.addr.parse().ok()).collect();
    let long_list: Vec<u8> = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("-").into_bytes();
    bench.compare(
        "encode an original list (1,400 B of 10,000)",
        || {
            black_box(peer_list::encode(addrs.iter(), peer_list::LEGACY_LIST_BUDGET));
        },
        "join all 10,000 as the original does",
        || {
            black_box(addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("-"));
        },
    );
    bench.compare(
        "parse an original list of 10,000",
        || {
            black_box(peer_list::parse(&long_list));
        },
        "split it on '-' and ':' only",
        || {
            black_box(long_list.split(|&b| b == b'-').map(|e| e.splitn(2, |&b| b == b':').count()).sum::<usize>());
        },
    );
}
