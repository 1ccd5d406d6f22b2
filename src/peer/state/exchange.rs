//! History between members, as the state decides it: asking a member that comes up (the join's
//! request, a catch-up after a lost link), answering within a link's budget, and taking answers in
//! (see `receipts`).

use super::*;

impl PeerState {
    /// Send `ask` to the member on link `id`; false when there is no such link.
    pub(super) fn ask_history(&mut self, now: Now, id: LinkId, ask: Ask) -> bool {
        let Some(link) = self.links.get(&id) else { return false };
        let (from, peer_id) = (link.shown_addr(), link.peer_id.clone());
        let req = self.requests.next_req();
        let limit = u32::try_from(ask.limit).unwrap_or(u32::MAX);
        let purpose = ask.purpose;
        log::debug!("asking {from} for {limit} messages of history ({purpose:?})");
        self.write_frame(id, &Frame::HistoryRequest { req, limit, after: ask.after.as_ref().map(sync::position) });
        self.out(Output::AskHistory { link: id, req });
        self.receipts.asked(id, req, from, purpose, now.at);
        self.requests.sent(id, req, peer_id, ask);
        true
    }

    /// A p2pchat link is up: tell it what recent messages we hold (see `recent`), and ask it for
    /// history if we are joining, or if it is a member we lost.
    pub(super) fn after_adopting(&mut self, now: Now, id: LinkId, peer_id: &str) {
        self.send_summary(now, id, false);
        if let Some(ask) = self.requests.on_link_up(peer_id) {
            if !self.ask_history(now, id, ask.clone()) {
                self.requests.not_asked(ask);
            }
        }
    }

    /// The join's history is still to be asked, answered or logged.
    fn join_history_pending(&self) -> bool {
        self.requests.join_pending() || self.receipts.join_open()
    }

    /// Compare the summaries that waited for the join's history, once it is in.
    pub(super) fn compare_deferred_summaries(&mut self, now: Now) {
        if self.deferred_summaries.is_empty() || self.join_history_pending() {
            return;
        }
        for (peer_id, summary) in std::mem::take(&mut self.deferred_summaries) {
            // By member, not by link: the link it came on may have been replaced by a duplicate since.
            let current = self
                .links
                .iter()
                .find(|(_, l)| l.kind == LinkKind::P2pchat && l.peer_id.as_deref() == Some(peer_id.as_str()));
            if let Some((&id, _)) = current {
                self.on_summary(now, id, summary);
            }
        }
    }

    /// Tell the member on link `id` which recent messages we hold; `reply`: ask for its own.
    pub(super) fn send_summary(&mut self, now: Now, id: LinkId, reply: bool) {
        let summary = self.seen.lock().map(|seen| seen.recent.summary(now.wall_ms)).unwrap_or_default();
        self.write_frame(id, &Frame::Summary { since: summary.since, buckets: summary.buckets, reply });
    }

    /// The member on link `id` holds these recent messages: ask it for those we lack, unless we
    /// are asking it for history already (that answer covers the same). While the join's history
    /// is still to come, wait for it: it brings most of what a newcomer lacks.
    pub(super) fn on_summary(&mut self, now: Now, id: LinkId, theirs: Summary) {
        let Some(peer_id) = self.links.get(&id).filter(|l| l.kind == LinkKind::P2pchat).and_then(|l| l.peer_id.clone())
        else {
            return;
        };
        if self.requests.is_asking(id) {
            return;
        }
        if self.join_history_pending() {
            return self.deferred_summaries.push((peer_id, theirs));
        }
        let Some(from) = self.seen.lock().ok().and_then(|seen| seen.recent.lacking(&theirs, now.wall_ms)) else {
            return;
        };
        let after = Some(Key { stamp: from, id: String::new() });
        self.ask_history(now, id, Ask { after, limit: self.history.answer_messages, purpose: sync::Purpose::CatchUp });
    }

    /// Answer a member's history request from our log, within its link's allowance.
    pub(super) fn answer_history(&mut self, now: Now, id: LinkId, req: u32, limit: u32, after: Option<Position>) {
        let Some(link) = self.links.get_mut(&id) else { return };
        if link.kind != LinkKind::P2pchat {
            return;
        }
        let Some(max_bytes) = link.budget.start(now.at) else {
            log::info!("{} asks for history faster than it may; answering with nothing", link.shown_addr());
            return self.write_frame(id, &Frame::History { req, msgs: Vec::new(), more: false });
        };
        let query = Query {
            after: after.map(sync::key),
            before: None,
            limit: (limit as usize).min(self.history.answer_messages),
            max_bytes,
            shared_only: true,
        };
        self.out(Output::AnswerHistory { link: id, req, query });
    }

    /// Our answer to a history request on `link` was queued: `bytes` of it.
    pub fn history_answered(&mut self, link: LinkId, bytes: usize) {
        if let Some(link) = self.links.get_mut(&link) {
            link.budget.finish(bytes);
        }
    }

    /// Take a part of an answer to one of our requests, up to the number of messages asked for, to
    /// the log.
    pub(super) fn take_history_part(&mut self, id: LinkId, req: u32, msgs: Vec<Chat>, more: bool) {
        let (msgs, last) = match self.requests.part(id, req, msgs, more) {
            Part::Passed { msgs, last } => (msgs, last),
            Part::Unasked => return log::debug!("ignoring history nobody asked for from link {id}"),
        };
        match self.receipts.part(id, req, !msgs.is_empty(), last) {
            Taken::Ingesting => self.out(Output::History { link: id, req, job: Job::Ingest(msgs) }),
            Taken::Empty => {}
            Taken::Overflow => {
                log::warn!("history from link {id} comes faster than it can be logged; dropping the rest of it");
                self.requests.give_up(id, req);
            }
        }
        self.finish_receipts();
    }

    /// The log took a part of the answer to our request `req` on `link`: `fresh` says which of `msgs`
    /// were new to it. Those not shown live this session are shown now, marked as history.
    pub fn history_ingested(&mut self, now: Now, link: LinkId, req: u32, msgs: Vec<Chat>, fresh: Vec<bool>) {
        let Some(from) = self.receipts.from(link, req) else { return };
        let mut shown = Vec::new();
        for (chat, is_new) in msgs.into_iter().zip(fresh) {
            self.clock.observe_at(chat.stamp(), now.wall_ms);
            // New to the log, and not shown live this session (the live copy may have come first).
            let first_time = self.seen.lock().map(|mut seen| {
                seen.recent.note(chat.stamp(), &chat.id);
                is_new && seen.first_time(&chat.id)
            });
            if first_time.unwrap_or(is_new) {
                // Verified only if signed by the key its author's name proved on a link here (its
                // signature was checked as the answer was read).
                let proven = self.private.is_some() && crate::peer::trust::proven(&chat, &self.room, &self.known_keys);
                let mut message = sync::message(chat, from, reader::received_at(now), true);
                message.signed = proven;
                shown.push(message);
            }
        }
        self.receipts.ingested(link, req, shown.len());
        if !shown.is_empty() {
            self.out(Output::History { link, req, job: Job::Show(shown) });
        }
        self.finish_receipts();
        self.compare_deferred_summaries(now);
    }

    /// Tell what ends each complete answer, and end its task.
    pub(super) fn finish_receipts(&mut self) {
        for ((link, req), last) in self.receipts.finished() {
            if let Some(event) = last {
                self.out(Output::History { link, req, job: Job::Tell(event) });
            }
            self.out(Output::HistoryDone { link, req });
        }
    }

    /// Link `id` is gone: a p2pchat member lost without a goodbye is caught up with if it comes back,
    /// and a join request it had not finished answering goes to another member.
    pub(super) fn forget_link_history(&mut self, now: Now, id: LinkId, peer_id: Option<String>, lost: bool) {
        if let (Some(peer_id), true) = (peer_id, lost) {
            // The link may have been dead for up to `dead_after` before that was noticed; a little
            // more covers clocks a few seconds apart. Anything fetched twice is shown once.
            let quiet_since = now.wall_ms.saturating_sub((self.limits.dead_after.as_millis() as u64) + 5_000);
            self.requests.lost(peer_id, crate::protocol::stamp_at(quiet_since), now.at, self.limits.redial_for * 2);
        }
        // No more parts come on it; what is being logged is still shown.
        self.receipts.link_done(id);
        self.finish_receipts();
        let Some((answering, rest)) = self.requests.link_gone(id) else { return };
        // Unanswered: ask again on the link that replaced this one (two peers that redial each other
        // keep one of the two links), or, for the join's history, any member; with neither up yet,
        // when one comes.
        let free = |id: LinkId, l: &Link| l.kind == LinkKind::P2pchat && !self.requests.is_asking(id);
        let same_peer = self
            .links
            .iter()
            .filter(|(id, l)| free(**id, l))
            .find(|(_, l)| l.peer_id.is_some() && l.peer_id == answering);
        let any = self.links.iter().filter(|(id, l)| free(**id, l)).find(|_| rest.purpose.is_join_history());
        let again = Ask { purpose: rest.purpose.asked_again(), ..rest.clone() };
        let asked = same_peer.or(any).map(|(&other, _)| other).is_some_and(|other| self.ask_history(now, other, again));
        if !asked {
            self.requests.ask_when_back(answering, rest, now.at);
        }
    }
}
