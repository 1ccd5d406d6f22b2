//! The tracker's peer list: `ip:port` entries joined by `-`, or the single byte `-` when empty.
//!
//! The original client reads it with a single `recv(2048)`, so the list we hand out must fit in one read
//! and, on a typical Internet path, in one TCP segment: we keep whole entries only, newest first, up to a
//! byte budget ([`LEGACY_LIST_BUDGET`]), and never cut an address in half as the original tracker does.
//! Entries are written oldest first, so a short list is byte-identical to the original tracker's.

use std::net::{IpAddr, SocketAddr};

/// The largest list we send: below one Ethernet-path TCP segment (~1460 bytes of payload) and below the
/// original client's 2048-byte read.
pub const LEGACY_LIST_BUDGET: usize = 1400;

/// How an address is written for an original client, which only understands `a.b.c.d:port`.
///
/// IPv4-mapped IPv6 addresses (what a dual-stack socket reports for an IPv4 peer) are written as plain
/// IPv4. Other IPv6 addresses cannot be dialled by an original client, so they get no entry.
pub fn legacy_entry(addr: &SocketAddr) -> Option<String> {
    match addr.ip() {
        IpAddr::V4(ip) => Some(format!("{ip}:{}", addr.port())),
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map(|v4| format!("{v4}:{}", addr.port())),
    }
}

/// Encode the list for a newcomer. `newest_first` yields the known addresses, most recent first.
///
/// Takes as many whole entries as fit in `budget` bytes (separators included), then writes them oldest
/// first. An empty selection is written as `-`, as the original does.
pub fn encode<'a>(newest_first: impl IntoIterator<Item = &'a SocketAddr>, budget: usize) -> Vec<u8> {
    let mut chosen: Vec<String> = Vec::new();
    let mut used = 0usize;
    for addr in newest_first {
        let Some(entry) = legacy_entry(addr) else { continue };
        let cost = entry.len() + usize::from(!chosen.is_empty());
        if used + cost > budget {
            break;
        }
        used += cost;
        chosen.push(entry);
    }
    if chosen.is_empty() {
        return b"-".to_vec();
    }
    chosen.reverse();
    chosen.join("-").into_bytes()
}

/// One entry of a received list that could not be used, kept so the caller can log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEntry(pub String);

/// Parse a tracker answer: split on `-`, drop empty parts, split each part at its last `:` into host and
/// port. Hosts must be IP addresses (trackers write what they saw); `[v6]:port` is accepted too.
///
/// Returns the usable addresses in list order, without duplicates, and the parts that were not usable.
pub fn parse(answer: &[u8]) -> (Vec<SocketAddr>, Vec<RejectedEntry>) {
    let text = String::from_utf8_lossy(answer);
    let mut addrs: Vec<SocketAddr> = Vec::new();
    // The original tracker's answer grows with everyone who ever joined: dedupe in O(1) per entry.
    let mut seen = std::collections::HashSet::new();
    let mut rejected = Vec::new();
    for part in text.split('-').map(str::trim).filter(|p| !p.is_empty()) {
        match parse_entry(part) {
            Some(addr) if seen.insert(addr) => addrs.push(addr),
            Some(_) => {}
            None => rejected.push(RejectedEntry(part.to_owned())),
        }
    }
    (addrs, rejected)
}

fn parse_entry(part: &str) -> Option<SocketAddr> {
    let (host, port) = part.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    if port == 0 || ip.is_unspecified() {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_list_is_a_lone_dash() {
        assert_eq!(encode([], LEGACY_LIST_BUDGET), b"-");
    }

    #[test]
    fn short_list_is_oldest_first_like_the_original() {
        let newest_first = [v4("10.0.0.3:3"), v4("10.0.0.2:2"), v4("10.0.0.1:1")];
        assert_eq!(encode(&newest_first, LEGACY_LIST_BUDGET), b"10.0.0.1:1-10.0.0.2:2-10.0.0.3:3");
    }

    #[test]
    fn long_list_keeps_newest_whole_entries_within_budget() {
        let newest_first: Vec<SocketAddr> = (0..500u16)
            .rev()
            .map(|i| SocketAddr::from(([192, 168, (i / 250) as u8, (i % 250) as u8], 40000 + i)))
            .collect();
        let out = encode(&newest_first, LEGACY_LIST_BUDGET);
        assert!(out.len() <= LEGACY_LIST_BUDGET);
        let (parsed, rejected) = parse(&out);
        assert!(rejected.is_empty());
        // Whatever was kept is the newest run, oldest first.
        let kept = parsed.len();
        let mut expected: Vec<SocketAddr> = newest_first[..kept].to_vec();
        expected.reverse();
        assert_eq!(parsed, expected);
        // And nothing else would have fit.
        let next = legacy_entry(&newest_first[kept]).unwrap();
        assert!(out.len() + 1 + next.len() > LEGACY_LIST_BUDGET);
    }

    #[test]
    fn ipv6_entries_are_mapped_or_left_out_for_original_clients() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:7000".parse().unwrap();
        let pure: SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
        assert_eq!(encode(&[pure, mapped], LEGACY_LIST_BUDGET), b"10.1.2.3:7000");
        assert_eq!(encode(&[pure], LEGACY_LIST_BUDGET), b"-");
    }

    #[test]
    fn parse_original_answers() {
        assert_eq!(parse(b"-"), (vec![], vec![]));
        assert_eq!(parse(b""), (vec![], vec![]));
        let (addrs, rejected) = parse(b"127.0.0.1:5000-127.0.0.1:5001");
        assert_eq!(addrs, vec![v4("127.0.0.1:5000"), v4("127.0.0.1:5001")]);
        assert!(rejected.is_empty());
    }

    #[test]
    fn parse_rejects_junk_and_keeps_the_rest() {
        let (addrs, rejected) = parse(b"127.0.0.1:5000-garbage-1.2.3.4:99999-1.2.3.4-0.0.0.0:5-127.0.0.1:5000-[::1]:7");
        assert_eq!(addrs, vec![v4("127.0.0.1:5000"), "[::1]:7".parse().unwrap()]);
        let rejected: Vec<String> = rejected.into_iter().map(|r| r.0).collect();
        assert_eq!(rejected, vec!["garbage", "1.2.3.4:99999", "1.2.3.4", "0.0.0.0:5"]);
    }

    #[test]
    fn a_list_cut_mid_address_loses_only_the_cut_entry() {
        // What an original tracker sends past 2048 bytes, or a second segment that has not arrived yet.
        let (addrs, rejected) = parse(b"10.0.0.1:5000-10.0.0.2:50");
        assert_eq!(addrs, vec![v4("10.0.0.1:5000"), v4("10.0.0.2:50")]);
        assert!(rejected.is_empty());
        let (addrs, rejected) = parse(b"10.0.0.1:5000-10.0.0.");
        assert_eq!(addrs, vec![v4("10.0.0.1:5000")]);
        assert_eq!(rejected.len(), 1);
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips_and_respects_the_budget(
            raw in proptest::collection::vec((any::<[u8; 4]>(), 1u16..), 0..300),
            budget in 0usize..3000,
        ) {
            let newest_first: Vec<SocketAddr> = raw.iter().map(|(ip, port)| SocketAddr::from((*ip, *port))).collect();
            let out = encode(&newest_first, budget);
            prop_assert!(out == b"-" || out.len() <= budget);
            let (parsed, _) = parse(&out);
            // Every parsed entry is one we gave, and they form a newest-first prefix (modulo unusable ones).
            for addr in &parsed {
                prop_assert!(newest_first.contains(addr));
            }
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse(&bytes);
        }
    }
}
