//! The application's side of a peer's events: one stream, in the order a newcomer should read it.
//!
//! Events come from several tasks: link readers (live messages), the driver (presence, notices) and
//! the task that takes the join's history answer (history messages, then `HistorySynced`). A
//! newcomer who saw live lines before the history they follow would read the conversation out of
//! order, so while the join's history is on its way everything else is held back here and handed
//! out after `HistorySynced`, in the order it happened.
//!
//! This is presentation, not protocol: it changes the order the application reads events in, never
//! what the peer accepts, logs or sends. The hold is bounded (`MAX_HELD`), so an answer that never
//! ends costs memory only up to that bound, and nothing is dropped: past it, the held events flow.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use super::{Event, PeerError};

/// Events held back at most while the join's history is fetched.
const MAX_HELD: usize = 10_000;

/// The stream of [`Event`]s of one peer. It ends after the peer closes.
///
/// While the history asked for on join is on its way, everything else (live messages, presence) is
/// held back here (at most `MAX_HELD` events) and comes after it, in the order it happened, so a
/// newcomer reads the conversation in order.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    /// Until the join's history is in (or `MAX_HELD` events wait), only history passes.
    holding: bool,
    held: VecDeque<Event>,
}

impl Events {
    /// `holding`: the peer asked for history on join, so hold live events until `HistorySynced`.
    pub(super) fn new(rx: mpsc::Receiver<Event>, holding: bool) -> Self {
        Events { rx, holding, held: VecDeque::new() }
    }

    /// The next event, or `None` once the peer is closed and every event was taken.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.release() {
                return Some(event);
            }
            match self.rx.recv().await {
                Some(event) => {
                    if let Some(event) = self.sort(event) {
                        return Some(event);
                    }
                }
                None if self.held.is_empty() => return None,
                // The peer closed before its history was in: what was held is all there is.
                None => self.holding = false,
            }
        }
    }

    /// An event already waiting, without waiting: `Ok(None)` if there is none yet,
    /// `Err(PeerError::Closed)` once the peer is closed and every event was taken.
    pub fn try_recv(&mut self) -> Result<Option<Event>, PeerError> {
        loop {
            if let Some(event) = self.release() {
                return Ok(Some(event));
            }
            match self.rx.try_recv() {
                Ok(event) => {
                    if let Some(event) = self.sort(event) {
                        return Ok(Some(event));
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) if self.held.is_empty() => return Err(PeerError::Closed),
                Err(mpsc::error::TryRecvError::Disconnected) => self.holding = false,
            }
        }
    }

    /// A held event that may go now (the oldest first).
    fn release(&mut self) -> Option<Event> {
        if self.holding {
            None
        } else {
            self.held.pop_front()
        }
    }

    /// The event to hand out now, or `None` when it is held back. Callers take what `release` gives
    /// first, so a live event never overtakes one held before it.
    fn sort(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Message(message) if message.history => Some(Event::Message(message)),
            Event::HistorySynced { received } => {
                self.holding = false;
                Some(Event::HistorySynced { received })
            }
            other if self.holding => {
                self.held.push_back(other);
                if self.held.len() >= MAX_HELD {
                    self.holding = false;
                }
                None
            }
            other => Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use super::*;
    use crate::peer::Message;

    fn message(text: &str, history: bool) -> Event {
        Event::Message(Message {
            sender: Some("ana".into()),
            text: text.into(),
            from: SocketAddr::from(([127, 0, 0, 1], 7000)),
            received_at: SystemTime::UNIX_EPOCH,
            starts_message: true,
            id: None,
            sent_at: None,
            stamp: None,
            history,
            signed: false,
        })
    }

    fn notice(text: &str) -> Event {
        Event::Notice { text: text.into() }
    }

    /// What `try_recv` hands out now, as short labels: `live:x`, `history:x`, `notice:x`, `synced:n`.
    fn drain(events: &mut Events) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(event)) = events.try_recv() {
            out.push(match event {
                Event::Message(m) if m.history => format!("history:{}", m.text),
                Event::Message(m) => format!("live:{}", m.text),
                Event::Notice { text } => format!("notice:{text}"),
                Event::HistorySynced { received } => format!("synced:{received}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    fn events(holding: bool, capacity: usize) -> (mpsc::Sender<Event>, Events) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Events::new(rx, holding))
    }

    #[test]
    fn without_a_join_history_events_pass_in_order() {
        let (tx, mut events) = events(false, 8);
        for event in [message("a", false), notice("n"), message("b", false)] {
            tx.try_send(event).unwrap();
        }
        assert_eq!(drain(&mut events), ["live:a", "notice:n", "live:b"]);
    }

    #[test]
    fn live_events_wait_for_the_join_history_then_follow_it_in_order() {
        let (tx, mut events) = events(true, 16);
        tx.try_send(message("live-1", false)).unwrap();
        tx.try_send(notice("joined")).unwrap();
        tx.try_send(message("old-1", true)).unwrap();
        // History passes at once; live events wait.
        assert_eq!(drain(&mut events), ["history:old-1"]);
        tx.try_send(message("live-2", false)).unwrap();
        tx.try_send(message("old-2", true)).unwrap();
        tx.try_send(Event::HistorySynced { received: 2 }).unwrap();
        tx.try_send(message("live-3", false)).unwrap();
        assert_eq!(
            drain(&mut events),
            ["history:old-2", "synced:2", "live:live-1", "notice:joined", "live:live-2", "live:live-3"]
        );
    }

    #[test]
    fn the_hold_is_bounded_and_loses_nothing() {
        let (tx, mut events) = events(true, MAX_HELD + 8);
        for i in 0..MAX_HELD + 5 {
            tx.try_send(message(&i.to_string(), false)).unwrap();
        }
        // The history never came: past the bound, the held events flow, the oldest first.
        let out = drain(&mut events);
        let expected: Vec<String> = (0..MAX_HELD + 5).map(|i| format!("live:{i}")).collect();
        assert_eq!(out, expected);
        // A late `HistorySynced` is still handed out, and changes nothing after it.
        tx.try_send(Event::HistorySynced { received: 0 }).unwrap();
        tx.try_send(message("after", false)).unwrap();
        assert_eq!(drain(&mut events), ["synced:0", "live:after"]);
    }

    #[test]
    fn a_peer_closed_before_its_history_came_still_hands_out_what_was_held() {
        let (tx, mut events) = events(true, 8);
        tx.try_send(message("said", false)).unwrap();
        tx.try_send(notice("left")).unwrap();
        drop(tx);
        assert_eq!(drain(&mut events), ["live:said", "notice:left"]);
        assert!(matches!(events.try_recv(), Err(PeerError::Closed)));
    }

    #[test]
    fn recv_waits_for_the_history_as_try_recv_does() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let (tx, mut events) = events(true, 8);
            tx.send(message("live", false)).await.unwrap();
            tx.send(message("old", true)).await.unwrap();
            tx.send(Event::HistorySynced { received: 1 }).await.unwrap();
            drop(tx);
            let mut got = Vec::new();
            while let Some(event) = events.recv().await {
                got.push(event);
            }
            assert_eq!(got, [message("old", true), Event::HistorySynced { received: 1 }, message("live", false)]);
        });
    }
}
