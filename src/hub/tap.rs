//! A tap on every commit, for consumers that follow many channels at once (webhooks) rather
//! than subscribing to each. It never blocks the writer: when the consumer falls behind, the
//! notice is dropped and the tap remembers it, so the consumer rescans the store instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::types::{ChannelName, Epoch, SharedMessage};

/// Committed messages of one channel, consecutive and in seq order.
#[derive(Debug)]
pub struct CommitNotice {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub messages: Vec<SharedMessage>,
}

/// The writer's end.
#[derive(Clone)]
pub struct CommitTap {
    sender: mpsc::Sender<CommitNotice>,
    state: Arc<TapState>,
}

/// The consumer's end.
pub struct CommitFeed {
    pub receiver: mpsc::Receiver<CommitNotice>,
    state: Arc<TapState>,
}

struct TapState {
    /// The consumer wants notices (it has something to deliver to).
    wanted: AtomicBool,
    /// A notice was dropped since the consumer last asked.
    overflowed: AtomicBool,
}

/// A tap holding at most `capacity` notices.
pub fn commit_tap(capacity: usize) -> (CommitTap, CommitFeed) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let state = Arc::new(TapState {
        wanted: AtomicBool::new(false),
        overflowed: AtomicBool::new(false),
    });
    (
        CommitTap {
            sender,
            state: state.clone(),
        },
        CommitFeed { receiver, state },
    )
}

impl CommitTap {
    pub fn notify(&self, channel: &ChannelName, epoch: &Epoch, messages: &[SharedMessage]) {
        if !self.state.wanted.load(Ordering::Relaxed) {
            return;
        }
        let notice = CommitNotice {
            channel: channel.clone(),
            epoch: epoch.clone(),
            messages: messages.to_vec(),
        };
        if self.sender.try_send(notice).is_err() {
            self.state.overflowed.store(true, Ordering::Release);
        }
    }
}

impl CommitFeed {
    /// Turns notices on or off (off while nothing would consume them).
    pub fn set_wanted(&self, wanted: bool) {
        self.state.wanted.store(wanted, Ordering::Relaxed);
    }

    /// Whether notices were dropped since the last call; clears the flag.
    pub fn take_overflow(&self) -> bool {
        self.state.overflowed.swap(false, Ordering::AcqRel)
    }
}
