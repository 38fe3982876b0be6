//! Live fan-out: per channel, a window of the newest committed messages and a wake-up signal.
//!
//! The window is both the hot read cache and the fan-out buffer. Publishing appends to it and
//! bumps a `watch` counter; it never waits for a subscriber. Each subscriber keeps its own cursor
//! and copies what is past it; one that falls behind the window reads the gap from the store.
//! So a slow subscriber costs nothing but its cursor, and cannot delay anyone else.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::retention::RetentionRules;
use super::types::{ChannelName, Epoch, Seq, SharedMessage};
use crate::engine::{LiveSink, Wake};

/// The most messages a window holds, whatever the retention allows.
pub const WINDOW_CAP: usize = 1024;

pub struct LiveChannel {
    state: Mutex<Window>,
    wake: watch::Sender<u64>,
    subscribers: AtomicUsize,
}

struct Window {
    /// `None` until a commit, a reset or a subscriber's store read tells us the epoch.
    epoch: Option<Epoch>,
    /// Contiguous messages in seq order, newest last.
    messages: VecDeque<SharedMessage>,
    cap: usize,
    last_activity_ms: i64,
}

/// What a subscriber finds when it looks past its cursor.
pub enum Look {
    /// Messages right after the cursor, in order.
    Messages(Vec<SharedMessage>),
    /// Messages after the cursor exist but are no longer in the window: read the store.
    Behind,
    /// The channel got a new epoch.
    Reset(Epoch),
    /// Nothing new yet.
    Nothing,
}

impl LiveChannel {
    fn new(cap: usize) -> Self {
        let (wake, _) = watch::channel(0);
        Self {
            state: Mutex::new(Window {
                epoch: None,
                messages: VecDeque::new(),
                cap,
                last_activity_ms: crate::clock::now_ms(),
            }),
            wake,
            subscribers: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // A panic while holding this lock leaves the window consistent (every mutation is a
        // single push/pop), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Records the epoch a subscriber read from the store, if none is known yet.
    pub fn learn_epoch(&self, epoch: &Epoch) {
        let mut w = self.lock();
        if w.epoch.is_none() {
            w.epoch = Some(epoch.clone());
        }
    }

    /// Up to `max` messages after `cursor` in `epoch`, and past the first, at most `max_bytes`
    /// of message JSON.
    pub fn look(&self, epoch: &Epoch, cursor: Seq, max: usize, max_bytes: usize) -> Look {
        let w = self.lock();
        match &w.epoch {
            Some(e) if e != epoch => return Look::Reset(e.clone()),
            _ => {}
        }
        let (Some(front), Some(back)) = (w.messages.front(), w.messages.back()) else {
            return Look::Nothing;
        };
        if back.seq <= cursor {
            return Look::Nothing;
        }
        if front.seq > cursor + 1 {
            return Look::Behind;
        }
        let start = (cursor + 1 - front.seq) as usize;
        let mut bytes = 0usize;
        let batch = w
            .messages
            .range(start..)
            .take(max)
            .enumerate()
            .take_while(|(i, m)| {
                bytes = bytes.saturating_add(m.json.len());
                *i == 0 || bytes <= max_bytes
            })
            .map(|(_, m)| m.clone())
            .collect();
        Look::Messages(batch)
    }

    /// Serves a read from memory when the window covers `after + 1` onwards.
    /// Returns `None` when the store must answer.
    pub fn read(&self, after: Seq, limit: usize) -> Option<WindowRead> {
        let w = self.lock();
        let epoch = w.epoch.clone()?;
        let front = w.messages.front()?;
        let back = w.messages.back()?;
        if front.seq > after + 1 || after > back.seq {
            return None;
        }
        let start = (after + 1 - front.seq) as usize;
        Some(WindowRead {
            epoch,
            messages: w.messages.range(start..).take(limit).cloned().collect(),
            last_seq: back.seq,
            first_in_window: front.seq,
        })
    }

    fn append(&self, epoch: &Epoch, messages: &[SharedMessage]) {
        {
            let mut w = self.lock();
            if w.epoch.as_ref() != Some(epoch) {
                w.epoch = Some(epoch.clone());
                w.messages.clear();
            }
            for m in messages {
                match w.messages.back() {
                    Some(last) if m.seq <= last.seq => continue,
                    Some(last) if m.seq != last.seq + 1 => w.messages.clear(),
                    _ => {}
                }
                w.messages.push_back(m.clone());
                if w.messages.len() > w.cap {
                    w.messages.pop_front();
                }
            }
            w.last_activity_ms = crate::clock::now_ms();
        }
    }

    fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn reset(&self, epoch: &Epoch) {
        {
            let mut w = self.lock();
            w.epoch = Some(epoch.clone());
            w.messages.clear();
            w.last_activity_ms = crate::clock::now_ms();
        }
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A read answered from the window.
pub struct WindowRead {
    pub epoch: Epoch,
    pub messages: Vec<SharedMessage>,
    pub last_seq: Seq,
    pub first_in_window: Seq,
}

/// Holds a subscriber's place; dropping it releases the count.
pub struct SubscriberGuard(Arc<LiveChannel>);

impl SubscriberGuard {
    pub fn channel(&self) -> &Arc<LiveChannel> {
        &self.0
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every live channel of this process.
pub struct Live {
    channels: Mutex<HashMap<ChannelName, Arc<LiveChannel>>>,
    retention: Arc<RetentionRules>,
    /// Followers of every commit (webhooks), if any.
    tap: std::sync::OnceLock<super::tap::CommitTap>,
}

impl Live {
    pub fn new(retention: Arc<RetentionRules>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            retention,
            tap: std::sync::OnceLock::new(),
        }
    }

    /// Installs the one commit tap (webhooks); a second call is ignored.
    pub fn set_tap(&self, tap: super::tap::CommitTap) {
        let _ = self.tap.set(tap);
    }

    fn map(&self) -> MutexGuard<'_, HashMap<ChannelName, Arc<LiveChannel>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_create(&self, channel: &ChannelName) -> Arc<LiveChannel> {
        let mut map = self.map();
        if let Some(c) = map.get(channel) {
            return c.clone();
        }
        let max = self.retention.for_channel(channel).max_messages;
        let cap = usize::try_from(max)
            .unwrap_or(WINDOW_CAP)
            .clamp(1, WINDOW_CAP);
        let c = Arc::new(LiveChannel::new(cap));
        map.insert(channel.clone(), c.clone());
        c
    }

    pub fn get(&self, channel: &ChannelName) -> Option<Arc<LiveChannel>> {
        self.map().get(channel).cloned()
    }

    /// Registers a subscriber; it must call this before reading its backlog from the store.
    pub fn subscribe(&self, channel: &ChannelName) -> SubscriberGuard {
        let c = self.get_or_create(channel);
        c.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGuard(c)
    }

    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        self.get(channel).map_or(0, |c| c.subscriber_count())
    }

    pub fn total_subscribers(&self) -> usize {
        self.map().values().map(|c| c.subscriber_count()).sum()
    }

    /// Forgets channels nobody watches that were idle for `idle_ms`, so memory follows activity.
    pub fn evict_idle(&self, idle_ms: i64) -> usize {
        let now = crate::clock::now_ms();
        let mut map = self.map();
        let before = map.len();
        // Only the map holds an Arc once no subscriber does, and subscribers get theirs under
        // this same lock, so nobody can be waiting on an evicted channel.
        map.retain(|_, c| Arc::strong_count(c) > 1 || now - c.lock().last_activity_ms < idle_ms);
        before - map.len()
    }
}

impl LiveSink for Live {
    fn committed_deferred(
        &self,
        channel: &ChannelName,
        epoch: &Epoch,
        messages: &[SharedMessage],
    ) -> Wake {
        let live = self.get_or_create(channel);
        live.append(epoch, messages);
        if let Some(tap) = self.tap.get() {
            tap.notify(channel, epoch, messages);
        }
        Wake::new(move || live.wake())
    }

    fn reset(&self, channel: &ChannelName, epoch: &Epoch) {
        if let Some(c) = self.get(channel) {
            c.reset(epoch);
        }
    }

    fn watched(&self) -> Vec<(ChannelName, Option<Epoch>, Seq)> {
        self.map()
            .iter()
            .filter(|(_, c)| c.subscriber_count() > 0)
            .map(|(name, c)| {
                let w = c.lock();
                let last = w.messages.back().map_or(0, |m| m.seq);
                (name.clone(), w.epoch.clone(), last)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::types::Message;
    use bytes::Bytes;

    fn msg(ch: &ChannelName, seq: Seq) -> SharedMessage {
        Arc::new(Message::new(
            ch.clone(),
            seq,
            seq.to_string(),
            0,
            Bytes::from_static(b"{}"),
        ))
    }

    fn seqs(look: Look) -> Vec<Seq> {
        match look {
            Look::Messages(m) => m.iter().map(|m| m.seq).collect(),
            Look::Behind => vec![u64::MAX],
            Look::Reset(_) => vec![u64::MAX - 1],
            Look::Nothing => vec![],
        }
    }

    #[test]
    fn window_serves_cursor_and_detects_lag_and_reset() {
        let live = Live::new(Arc::new(RetentionRules::default()));
        let ch = ChannelName::parse("c").unwrap();
        let e1 = Epoch::random();
        let sub = live.subscribe(&ch);
        let batch: Vec<_> = (1..=WINDOW_CAP as u64 + 10).map(|s| msg(&ch, s)).collect();
        live.committed(&ch, &e1, &batch);
        let c = sub.channel();
        assert_eq!(
            seqs(c.look(&e1, 0, 5, usize::MAX)),
            vec![u64::MAX],
            "seq 1 fell out of the window"
        );
        let last = WINDOW_CAP as u64 + 10;
        assert_eq!(
            seqs(c.look(&e1, last - 2, 5, usize::MAX)),
            vec![last - 1, last]
        );
        assert_eq!(seqs(c.look(&e1, last, 5, usize::MAX)), Vec::<Seq>::new());
        // A duplicate commit is ignored; a gap clears the window.
        live.committed(&ch, &e1, &[msg(&ch, last)]);
        assert_eq!(seqs(c.look(&e1, last - 1, 5, usize::MAX)), vec![last]);
        live.committed(&ch, &e1, &[msg(&ch, last + 5)]);
        assert_eq!(seqs(c.look(&e1, last, 5, usize::MAX)), vec![u64::MAX]);
        let e2 = Epoch::random();
        live.reset(&ch, &e2);
        assert_eq!(seqs(c.look(&e1, last, 5, usize::MAX)), vec![u64::MAX - 1]);
        assert_eq!(live.subscriber_count(&ch), 1);
        drop(sub);
        assert_eq!(live.subscriber_count(&ch), 0);
        assert_eq!(live.evict_idle(-1), 1);
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_never_empty() {
        let live = Live::new(Arc::new(RetentionRules::default()));
        let ch = ChannelName::parse("c").unwrap();
        let e1 = Epoch::random();
        let sub = live.subscribe(&ch);
        let batch: Vec<_> = (1..=10).map(|s| msg(&ch, s)).collect();
        live.committed(&ch, &e1, &batch);
        let c = sub.channel();
        // Each message's JSON is 2 bytes.
        assert_eq!(seqs(c.look(&e1, 0, 100, 5)), vec![1, 2]);
        assert_eq!(seqs(c.look(&e1, 2, 100, 6)), vec![3, 4, 5]);
        assert_eq!(
            seqs(c.look(&e1, 0, 100, 0)),
            vec![1],
            "one message even over the budget"
        );
        assert_eq!(seqs(c.look(&e1, 0, 2, usize::MAX)), vec![1, 2]);
    }
}
