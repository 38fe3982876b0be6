//! Domain values of the hub, validated once at the edge and trusted everywhere after.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use rand::Rng;
use serde::{Serialize, Serializer};

/// Why a client-supplied value was refused; the text is shown to the client as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// A channel name: `[A-Za-z0-9_.@-]+` segments joined by single `:`, at most 255 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw.is_empty() {
            return Err(InvalidValue("channel name is empty".into()));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(InvalidValue(format!(
                "channel name is {} bytes long; the limit is {}",
                raw.len(),
                Self::MAX_LEN
            )));
        }
        for segment in raw.split(':') {
            if segment.is_empty() {
                return Err(InvalidValue(format!(
                    "channel name {raw:?} has an empty segment (segments are joined by single ':')"
                )));
            }
            if let Some(bad) = segment.chars().find(|c| !is_channel_char(*c)) {
                return Err(InvalidValue(format!(
                    "channel name {raw:?} contains {bad:?}; allowed are A-Z a-z 0-9 _ . @ - and ':' between segments"
                )));
            }
        }
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-')
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for ChannelName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A position in a channel's history; 0 means "before the first message".
pub type Seq = u64;

/// Identifies one history of a channel; a new one means the old history is gone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    const LEN: usize = 12;
    const ALPHABET: &'static [u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

    pub fn random() -> Self {
        let mut rng = rand::thread_rng();
        let s: String = (0..Self::LEN)
            .map(|_| Self::ALPHABET[rng.gen_range(0..Self::ALPHABET.len())] as char)
            .collect();
        Self(s.into())
    }

    /// An epoch derived from bytes (e.g. a hash), so an unpublished channel has a stable one.
    pub fn from_digest(digest: &[u8]) -> Self {
        let s: String = digest
            .iter()
            .take(Self::LEN)
            .map(|b| Self::ALPHABET[*b as usize % Self::ALPHABET.len()] as char)
            .collect();
        Self(s.into())
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if (8..=16).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Ok(Self(raw.into()))
        } else {
            Err(InvalidValue(format!(
                "epoch {raw:?} is not 8-16 letters and digits"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A message's dedupe key: printable ASCII, 1-128 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageId(String);

impl MessageId {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw.is_empty() || raw.len() > 128 {
            return Err(InvalidValue("id must be 1-128 characters".into()));
        }
        if !raw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(InvalidValue("id must be printable ASCII".into()));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn generate() -> Self {
        Self(ulid::Ulid::new().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A message's event name: 1-64 characters of `[A-Za-z0-9_.:-]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventName(String);

impl EventName {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidValue(format!(
                "event {raw:?} must be 1-64 characters of A-Z a-z 0-9 _ . : -"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for EventName {
    fn default() -> Self {
        Self("message".into())
    }
}

/// The largest `data` a message may carry, serialized.
pub const MAX_DATA_BYTES: usize = 64 * 1024;

/// A message's `data`: compact JSON text, validated and size-checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data(String);

impl Data {
    /// Accepts already-valid JSON text and compacts it, so stored and framed bytes never hold
    /// a newline (SSE `data:` lines could not carry one).
    pub fn from_valid_json(raw: &str) -> Result<Self, DataError> {
        let compact = crate::hub::json::compact(raw);
        if compact.len() > MAX_DATA_BYTES {
            return Err(DataError::TooLarge(compact.len()));
        }
        Ok(Self(compact))
    }

    pub fn from_value(value: &serde_json::Value) -> Result<Self, DataError> {
        let text = serde_json::to_string(value).map_err(|e| DataError::Invalid(e.to_string()))?;
        if text.len() > MAX_DATA_BYTES {
            return Err(DataError::TooLarge(text.len()));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("data is {0} bytes serialized; the limit is 65536")]
    TooLarge(usize),
    #[error("data is not valid JSON: {0}")]
    Invalid(String),
}

/// What a publisher hands to the hub: everything but the fields the hub assigns.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub id: Option<MessageId>,
    pub event: EventName,
    pub data: Data,
}

/// A committed message. Its JSON is built once; every transport frames those same bytes.
#[derive(Debug)]
pub struct Message {
    pub channel: ChannelName,
    pub seq: Seq,
    pub id: String,
    /// Milliseconds since the Unix epoch when the hub accepted it.
    pub time_ms: i64,
    /// The whole message object as compact JSON.
    pub json: Bytes,
    /// The WebSocket text frame, validated as UTF-8 once for every subscriber (`None` if the
    /// stored JSON was not UTF-8).
    ws_frame: OnceLock<Option<axum::extract::ws::Utf8Bytes>>,
    sse_frame: OnceLock<Bytes>,
}

impl Message {
    pub fn new(channel: ChannelName, seq: Seq, id: String, time_ms: i64, json: Bytes) -> Self {
        Self {
            channel,
            seq,
            id,
            time_ms,
            json,
            ws_frame: OnceLock::new(),
            sse_frame: OnceLock::new(),
        }
    }

    /// Serializes a message the way every transport shows it.
    pub fn encode(
        channel: &ChannelName,
        seq: Seq,
        id: &str,
        event: &str,
        time_ms: i64,
        data: &str,
    ) -> Bytes {
        let mut out = Vec::with_capacity(96 + channel.as_str().len() + id.len() + data.len());
        out.extend_from_slice(b"{\"channel\":");
        push_json_str(&mut out, channel.as_str());
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b",\"id\":");
        push_json_str(&mut out, id);
        out.extend_from_slice(b",\"event\":");
        push_json_str(&mut out, event);
        out.extend_from_slice(b",\"time\":\"");
        out.extend_from_slice(crate::clock::rfc3339_ms(time_ms).as_bytes());
        out.extend_from_slice(b"\",\"data\":");
        out.extend_from_slice(data.as_bytes());
        out.push(b'}');
        Bytes::from(out)
    }

    /// `{"op":"message",…message fields…}`, built once and shared by every WebSocket.
    pub fn ws_frame(&self) -> Option<axum::extract::ws::Utf8Bytes> {
        self.ws_frame
            .get_or_init(|| {
                let mut out = Vec::with_capacity(self.json.len() + 16);
                out.extend_from_slice(b"{\"op\":\"message\",");
                out.extend_from_slice(self.json.get(1..).unwrap_or_default());
                String::from_utf8(out)
                    .ok()
                    .map(axum::extract::ws::Utf8Bytes::from)
            })
            .clone()
    }

    /// The SSE event for this message (`id: epoch:seq`, `data: json`), built once per epoch.
    pub fn sse_frame(&self, epoch: &Epoch) -> Bytes {
        let build = || {
            let mut out = Vec::with_capacity(self.json.len() + 48);
            out.extend_from_slice(b"id: ");
            out.extend_from_slice(epoch.as_str().as_bytes());
            out.push(b':');
            out.extend_from_slice(self.seq.to_string().as_bytes());
            out.extend_from_slice(b"\ndata: ");
            out.extend_from_slice(&self.json);
            out.extend_from_slice(b"\n\n");
            Bytes::from(out)
        };
        let frame = self.sse_frame.get_or_init(build);
        // A message belongs to exactly one epoch, so the cached frame is always the right one;
        // the check guards against a caller passing another epoch by mistake.
        if frame[4..].starts_with(epoch.as_str().as_bytes()) {
            frame.clone()
        } else {
            build()
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is correct and fast; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

pub type SharedMessage = Arc<Message>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in [
            "a",
            "feeds:stackoverflow",
            "jobs:build:01JD",
            "accounts:42",
            "a.b@c-d_e",
        ] {
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ":", "a:", ":a", "a::b", "a b", "a/b", "é", "a*"] {
            assert!(ChannelName::parse(bad).is_err(), "{bad}");
        }
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        assert!(ChannelName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn ids_and_events() {
        assert!(MessageId::parse("x").is_ok());
        assert!(MessageId::parse(&"x".repeat(128)).is_ok());
        assert!(MessageId::parse(&"x".repeat(129)).is_err());
        assert!(MessageId::parse("").is_err());
        assert!(MessageId::parse("tab\there").is_err());
        assert!(EventName::parse("entry").is_ok());
        assert!(EventName::parse("a:b.c-d_e").is_ok());
        assert!(EventName::parse("").is_err());
        assert!(EventName::parse("sp ace").is_err());
        assert!(EventName::parse(&"e".repeat(65)).is_err());
    }

    #[test]
    fn epochs() {
        let e = Epoch::random();
        assert!(Epoch::parse(e.as_str()).is_ok());
        assert!(Epoch::parse("short").is_err());
        assert!(Epoch::parse("has-dash-in-it").is_err());
        assert_eq!(Epoch::from_digest(&[0u8; 32]).as_str().len(), 12);
    }

    #[test]
    fn message_frames_share_the_json() {
        let ch = ChannelName::parse("c").unwrap();
        let json = Message::encode(&ch, 7, "k\"1", "message", 0, "{\"a\":1}");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["id"], "k\"1");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["data"]["a"], 1);
        let m = Message::new(ch, 7, "k\"1".into(), 0, json);
        let ws: serde_json::Value = serde_json::from_str(m.ws_frame().unwrap().as_str()).unwrap();
        assert_eq!(ws["op"], "message");
        assert_eq!(ws["seq"], 7);
        let epoch = Epoch::parse("abcdefgh").unwrap();
        let sse = m.sse_frame(&epoch);
        assert!(sse.starts_with(b"id: abcdefgh:7\ndata: {"));
        assert!(sse.ends_with(b"}\n\n"));
    }

    #[test]
    fn data_limits() {
        let big = format!("\"{}\"", "x".repeat(MAX_DATA_BYTES));
        assert!(matches!(
            Data::from_valid_json(&big),
            Err(DataError::TooLarge(_))
        ));
        assert_eq!(
            Data::from_valid_json("{ \"a\" : [1, 2] }")
                .unwrap()
                .as_str(),
            "{\"a\":[1,2]}"
        );
    }
}
