//! The peers `tidings bench fanout --peer NAME` drives with the same load as Tidings (see
//! `scripts/peers.sh`, which installs and starts them on loopback): their URLs, what the
//! publisher sends them, and the little of each wire protocol a subscriber needs.
//!
//! Peers have no per-channel sequence number, so the publisher numbers its messages: the
//! published body is the `data` object Tidings gets (send time and padding) with an `"n"`
//! (1, 2, …) in front, and subscribers track order, loss and duplicates with it.
//!
//! Redis pub/sub is the odd one out: no HTTP, no WebSocket. Its subscribers and publisher speak
//! RESP over plain TCP with the small reader below ([`RespReader`]) rather than the `redis`
//! crate, so that one subscriber is exactly one TCP connection with one read buffer and one
//! task — the same per-connection cost model as the WebSocket paths — and the bytes on the
//! wire are the ones the run accounts for (no client-side multiplexing or reconnect logic).

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// nginx + Nchan: WebSocket subscribers on `/sub/{channel}` (each text frame is one
    /// published body), publishes by `POST /pub/{channel}`.
    Nchan,
    /// `bench/peers/socketio/server.js`: Socket.IO v5 over a bare WebSocket on
    /// `/socket.io/?EIO=4&transport=websocket&channel={channel}`, publishes by
    /// `POST /pub/{channel}`.
    Socketio,
    /// `redis-server` pub/sub: each subscriber is a plain TCP connection that sends
    /// `SUBSCRIBE channel` (the `subscribe` confirmation means subscribed) and then gets
    /// `message` pushes carrying the published body; publishes are `PUBLISH channel body` on
    /// the publisher's own connection, one in flight per connection (its integer reply is the
    /// acknowledgement, as the HTTP 201/202 is for the others).
    Redis,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Nchan => "nchan",
            Peer::Socketio => "socketio",
            Peer::Redis => "redis",
        }
    }

    /// Whether the peer speaks HTTP (and WebSocket); Redis speaks RESP over TCP.
    pub fn is_http(self) -> bool {
        self != Peer::Redis
    }

    /// The WebSocket path a subscriber opens (none for Redis).
    pub fn subscribe_path(self, channel: &str) -> String {
        match self {
            Peer::Nchan | Peer::Redis => format!("/sub/{channel}"),
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
            Peer::Socketio | Peer::Redis => status == 201,
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

/// One RESP2 reply, as far as the bench needs: simple strings, errors, integers, bulk strings
/// and (nested) arrays of them. `Nil` is the null bulk string or array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Resp>),
    Nil,
}

impl Resp {
    /// The text of a bulk or simple string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Bulk(b) => std::str::from_utf8(b).ok(),
            Resp::Simple(s) => Some(s),
            _ => None,
        }
    }
}

/// The largest bulk string or array the reader accepts (a published body is at most ~61 KiB).
const RESP_MAX_LEN: usize = 1 << 20;

/// Encodes a command as a RESP array of bulk strings (`SUBSCRIBE c`, `PUBLISH c body`, `PING`).
pub fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write;
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(Some((reply, bytes used)))`, `Ok(None)` when
/// `buf` holds only part of one, or why the stream is not RESP.
pub fn parse_resp(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > RESP_MAX_LEN {
            return Err("RESP line too long".into());
        }
        return Ok(None);
    };
    let Some((&kind, line)) = buf[..end].split_first() else {
        return Err("empty RESP line".into());
    };
    let line = std::str::from_utf8(line).map_err(|_| "RESP line is not UTF-8".to_owned())?;
    let after = end + 2;
    let len = |line: &str| -> Result<Option<usize>, String> {
        match line.parse::<i64>() {
            Ok(-1) => Ok(None),
            Ok(n) if (0..=RESP_MAX_LEN as i64).contains(&n) => Ok(Some(n as usize)),
            _ => Err(format!("bad RESP length {line:?}")),
        }
    };
    match kind {
        b'+' => Ok(Some((Resp::Simple(line.to_owned()), after))),
        b'-' => Ok(Some((Resp::Error(line.to_owned()), after))),
        b':' => line
            .parse()
            .map(|n| Some((Resp::Int(n), after)))
            .map_err(|_| format!("bad RESP integer {line:?}")),
        b'$' => {
            let Some(n) = len(line)? else {
                return Ok(Some((Resp::Nil, after)));
            };
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err("RESP bulk string not followed by CRLF".into());
            }
            Ok(Some((
                Resp::Bulk(buf[after..after + n].to_vec()),
                after + n + 2,
            )))
        }
        b'*' => {
            let Some(n) = len(line)? else {
                return Ok(Some((Resp::Nil, after)));
            };
            let mut items = Vec::with_capacity(n.min(16));
            let mut at = after;
            for _ in 0..n {
                match parse_resp(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(items), at)))
        }
        other => Err(format!("unexpected RESP type byte {:?}", other as char)),
    }
}

/// Buffers bytes read from a RESP connection and hands out whole replies.
#[derive(Debug, Default)]
pub struct RespReader {
    buf: BytesMut,
}

impl RespReader {
    /// Room for the next read (grows as replies need).
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(4096);
        }
        &mut self.buf
    }

    /// The next whole reply in the buffer, if there is one.
    pub fn take_reply(&mut self) -> Result<Option<Resp>, String> {
        match parse_resp(&self.buf)? {
            Some((reply, used)) => {
                self.buf.advance(used);
                Ok(Some(reply))
            }
            None => Ok(None),
        }
    }
}

/// A push a Redis subscriber gets, as far as the bench cares.
#[derive(Debug, PartialEq, Eq)]
pub enum RedisPush<'a> {
    /// `subscribe channel count`: the subscription is in place.
    Subscribed,
    /// `message channel body`.
    Message(&'a [u8]),
    /// `pong` (a PING while subscribed is answered as `["pong", ""]`).
    Pong,
    /// An error reply.
    Error(&'a str),
    Other,
}

/// Classifies what a subscribed connection received.
pub fn redis_push(reply: &Resp) -> RedisPush<'_> {
    match reply {
        Resp::Error(e) => RedisPush::Error(e),
        Resp::Simple(s) if s.eq_ignore_ascii_case("pong") => RedisPush::Pong,
        Resp::Array(items) => match (items.first().and_then(Resp::as_str), items.as_slice()) {
            (Some("subscribe"), _) => RedisPush::Subscribed,
            (Some("message"), [_, _, Resp::Bulk(body)]) => RedisPush::Message(body),
            (Some("pong"), _) => RedisPush::Pong,
            _ => RedisPush::Other,
        },
        _ => RedisPush::Other,
    }
}

/// Reads from `tcp` until `reader` holds a whole reply. Cancel-safe: bytes read so far stay in
/// `reader`.
pub async fn read_reply(tcp: &mut TcpStream, reader: &mut RespReader) -> Result<Resp, String> {
    loop {
        if let Some(reply) = reader.take_reply()? {
            return Ok(reply);
        }
        match tcp.read_buf(reader.buf_mut()).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("connection error: {e}")),
        }
    }
}

/// One RESP connection to Redis: a subscriber's or a publisher's.
pub struct RedisConn {
    pub tcp: TcpStream,
    pub reader: RespReader,
    /// Set once a call failed mid-way: the connection is out of step and is not reused.
    broken: bool,
}

impl RedisConn {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            reader: RespReader::default(),
            broken: false,
        }
    }

    pub fn is_open(&self) -> bool {
        !self.broken
    }

    /// Sends one command and reads its reply (one in flight: no pipelining).
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Resp, String> {
        let mut cmd = Vec::with_capacity(64 + args.iter().map(|a| a.len()).sum::<usize>());
        resp_command(&mut cmd, args);
        self.broken = true;
        self.tcp
            .write_all(&cmd)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let reply = read_reply(&mut self.tcp, &mut self.reader).await?;
        self.broken = false;
        Ok(reply)
    }

    /// `SUBSCRIBE channel`, then waits for its confirmation (pushes before it are skipped).
    pub async fn subscribe(&mut self, channel: &str) -> Result<(), String> {
        let mut cmd = Vec::with_capacity(32 + channel.len());
        resp_command(&mut cmd, &[b"SUBSCRIBE", channel.as_bytes()]);
        self.tcp
            .write_all(&cmd)
            .await
            .map_err(|e| format!("sending SUBSCRIBE: {e}"))?;
        loop {
            let reply = read_reply(&mut self.tcp, &mut self.reader)
                .await
                .map_err(|e| format!("before subscribed: {e}"))?;
            match redis_push(&reply) {
                RedisPush::Subscribed => return Ok(()),
                RedisPush::Error(e) => return Err(format!("SUBSCRIBE refused: {e}")),
                _ => {}
            }
        }
    }

    /// Sends `PING` on a subscribed connection (answered by a `pong` push).
    pub async fn send_ping(&mut self) -> Result<(), String> {
        let mut cmd = Vec::with_capacity(16);
        resp_command(&mut cmd, &[b"PING"]);
        self.tcp
            .write_all(&cmd)
            .await
            .map_err(|e| format!("sending PING: {e}"))
    }

    /// The next reply or push (cancel-safe).
    pub async fn next_reply(&mut self) -> Result<Resp, String> {
        read_reply(&mut self.tcp, &mut self.reader).await
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
    fn encodes_resp_commands() {
        let mut out = Vec::new();
        resp_command(&mut out, &[b"PUBLISH", b"ch", b"{\"n\":1}"]);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$7\r\n{\"n\":1}\r\n"
        );
    }

    #[test]
    fn parses_resp_replies() {
        assert_eq!(parse_resp(b":3\r\n+OK"), Ok(Some((Resp::Int(3), 4))));
        assert_eq!(
            parse_resp(b"+PONG\r\n"),
            Ok(Some((Resp::Simple("PONG".into()), 7)))
        );
        assert_eq!(
            parse_resp(b"-ERR no\r\n"),
            Ok(Some((Resp::Error("ERR no".into()), 9)))
        );
        assert_eq!(parse_resp(b"$-1\r\n"), Ok(Some((Resp::Nil, 5))));
        assert_eq!(
            parse_resp(b"$0\r\n\r\n"),
            Ok(Some((Resp::Bulk(Vec::new()), 6)))
        );
        // Partial input waits for more; garbage is an error.
        assert_eq!(parse_resp(b""), Ok(None));
        assert_eq!(parse_resp(b"$5\r\nab"), Ok(None));
        assert_eq!(parse_resp(b"*2\r\n$1\r\na\r\n"), Ok(None));
        assert!(parse_resp(b"?x\r\n").is_err());
        assert!(parse_resp(b"$5\r\nabcdefg\r\n").is_err());
        assert!(parse_resp(b"$-7\r\n").is_err());
        assert!(parse_resp(b":x\r\n").is_err());
    }

    #[test]
    fn reads_subscriber_pushes_split_anywhere() {
        let mut body = String::new();
        super::body(&mut body, 2, 99, "pp");
        let mut wire = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n".to_vec();
        wire.extend_from_slice(
            format!(
                "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n${}\r\n{body}\r\n",
                body.len()
            )
            .as_bytes(),
        );
        wire.extend_from_slice(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        for split in 0..wire.len() {
            let mut r = RespReader::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                r.buf_mut().extend_from_slice(part);
                while let Some(reply) = r.take_reply().expect("valid RESP") {
                    got.push(reply);
                }
            }
            let kinds: Vec<_> = got.iter().map(redis_push).collect();
            assert_eq!(
                kinds,
                vec![
                    RedisPush::Subscribed,
                    RedisPush::Message(body.as_bytes()),
                    RedisPush::Pong
                ],
                "split at {split}"
            );
        }
        let d: PeerData = serde_json::from_str(&body).expect("json");
        assert_eq!((d.n, d.t), (Some(2), Some(99)));
        assert_eq!(
            redis_push(&Resp::Error("ERR x".into())),
            RedisPush::Error("ERR x")
        );
        assert_eq!(redis_push(&Resp::Int(1)), RedisPush::Other);
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
