//! The peers `tidings bench fanout --peer NAME` drives with the same load as Tidings (see
//! `scripts/peers.sh`, which installs and starts them on loopback): their URLs, what the
//! publisher sends them, and the little of each wire protocol a subscriber needs.
//!
//! Peers have no per-channel sequence number, so the publisher numbers its messages: the
//! published body is the `data` object Tidings gets (send time and padding) with an `"n"`
//! (1, 2, …) in front, and subscribers track order, loss and duplicates with it.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// nginx + Nchan: WebSocket subscribers on `/sub/{channel}` (each text frame is one
    /// published body), publishes by `POST /pub/{channel}`.
    Nchan,
    /// `bench/peers/socketio/server.js`: Socket.IO v5 over a bare WebSocket on
    /// `/socket.io/?EIO=4&transport=websocket&channel={channel}`, publishes by
    /// `POST /pub/{channel}`.
    Socketio,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Nchan => "nchan",
            Peer::Socketio => "socketio",
        }
    }

    /// The WebSocket path a subscriber opens.
    pub fn subscribe_path(self, channel: &str) -> String {
        match self {
            Peer::Nchan => format!("/sub/{channel}"),
            Peer::Socketio => {
                format!("/socket.io/?EIO=4&transport=websocket&channel={channel}")
            }
        }
    }

    /// Where the publisher POSTs.
    pub fn publish_path(self, channel: &str) -> String {
        format!("/pub/{channel}")
    }

    /// Whether a publish answered with `status` was accepted. Nchan answers 202 instead of
    /// 201 when the channel had no subscriber at that moment: the message is stored, and
    /// counted as acknowledged (a missing subscriber shows as loss).
    pub fn accepted(self, status: u16) -> bool {
        match self {
            Peer::Nchan => status == 201 || status == 202,
            Peer::Socketio => status == 201,
        }
    }
}

/// The body published to a peer: `{"n":N,` + the `data` object of the Tidings path.
pub fn body(out: &mut String, n: u64, t_ns: u64, pad: &str) {
    use std::fmt::Write;
    let mut data = String::with_capacity(pad.len() + 40);
    super::stamped_data(&mut data, t_ns, pad);
    let _ = write!(out, "{{\"n\":{n},");
    // `stamped_data` writes an object: drop its `{`, the rest follows the `n` member.
    out.push_str(data.strip_prefix('{').unwrap_or(&data));
}

/// The fields of a published body a subscriber looks at.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct PeerData {
    pub n: Option<u64>,
    pub t: Option<u64>,
}

/// One Engine.IO v4 / Socket.IO v5 text packet, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
pub enum SioPacket<'a> {
    /// Engine.IO `0{...}`: the transport is open.
    Open,
    /// Engine.IO `1`: the server closes the transport.
    Close,
    /// Engine.IO `2`: answer with [`SIO_PONG`].
    Ping,
    /// Socket.IO `40{...}`: joined the main namespace.
    Connected,
    /// Socket.IO `41`: the server disconnected this client.
    Disconnected,
    /// Socket.IO `44{...}`: the connection was refused, with the server's reason.
    ConnectError(&'a str),
    /// Socket.IO `42["message",DATA]`: an event named `message`, with DATA's JSON text.
    Message(&'a str),
    /// Anything else (other events, noop, ...).
    Other,
}

/// What the client sends to join the main namespace (no auth payload).
pub const SIO_CONNECT: &str = "40";
/// The answer to an Engine.IO ping.
pub const SIO_PONG: &str = "3";

/// Classifies one text frame of a Socket.IO WebSocket.
pub fn parse_sio(text: &str) -> SioPacket<'_> {
    let mut chars = text.chars();
    match chars.next() {
        Some('0') => SioPacket::Open,
        Some('1') => SioPacket::Close,
        Some('2') => SioPacket::Ping,
        Some('4') => {
            let rest = chars.as_str();
            match rest.as_bytes().first() {
                Some(b'0') => SioPacket::Connected,
                Some(b'1') => SioPacket::Disconnected,
                Some(b'4') => SioPacket::ConnectError(&rest[1..]),
                Some(b'2') => rest[1..]
                    .strip_prefix("[\"message\",")
                    .and_then(|d| d.strip_suffix(']'))
                    .map_or(SioPacket::Other, SioPacket::Message),
                _ => SioPacket::Other,
            }
        }
        _ => SioPacket::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_stamped_data_with_a_number() {
        let mut b = String::new();
        body(&mut b, 7, 42, "xx");
        assert_eq!(b, r#"{"n":7,"t":42,"pad":"xx"}"#);
        let d: PeerData = serde_json::from_str(&b).expect("json");
        assert_eq!(
            d,
            PeerData {
                n: Some(7),
                t: Some(42)
            }
        );
    }

    #[test]
    fn parses_socketio_packets() {
        assert_eq!(
            parse_sio(r#"0{"sid":"a","upgrades":[],"pingInterval":25000}"#),
            SioPacket::Open
        );
        assert_eq!(parse_sio(r#"40{"sid":"b"}"#), SioPacket::Connected);
        assert_eq!(parse_sio("2"), SioPacket::Ping);
        assert_eq!(parse_sio("1"), SioPacket::Close);
        assert_eq!(parse_sio("41"), SioPacket::Disconnected);
        assert_eq!(
            parse_sio(r#"44{"message":"no"}"#),
            SioPacket::ConnectError(r#"{"message":"no"}"#)
        );
        assert_eq!(
            parse_sio(r#"42["message",{"n":1,"t":2,"pad":"x"}]"#),
            SioPacket::Message(r#"{"n":1,"t":2,"pad":"x"}"#)
        );
        assert_eq!(parse_sio(r#"42["other",{}]"#), SioPacket::Other);
        assert_eq!(parse_sio(""), SioPacket::Other);
        assert_eq!(parse_sio("4"), SioPacket::Other);
    }

    #[test]
    fn paths() {
        assert_eq!(Peer::Nchan.subscribe_path("c"), "/sub/c");
        assert_eq!(
            Peer::Socketio.subscribe_path("c"),
            "/socket.io/?EIO=4&transport=websocket&channel=c"
        );
        assert_eq!(Peer::Socketio.publish_path("c"), "/pub/c");
        assert!(Peer::Nchan.accepted(202) && !Peer::Socketio.accepted(202));
    }
}
