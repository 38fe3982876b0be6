//! A local feed server for the feed poller tests (loopback only): a Q&A-style Atom feed with a
//! sliding window the test controls and conditional GET, feeds in other formats and encodings,
//! and broken ones (garbage, HTML, huge, endless, redirect loops, errors). Every request is
//! recorded so tests can assert what the poller sent and when.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;

use crate::support::WAIT;

/// One feed entry as the server writes it (times and links verbatim into the document).
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub title: String,
    pub author: String,
    pub link: String,
    pub published: String,
    pub updated: String,
    pub summary: String,
    pub categories: Vec<String>,
}

/// Unix time of 2024-03-01T10:00:00Z, the first question's time.
const ORIGIN: i64 = 1_709_287_200;

/// RFC 3339 UTC of `ORIGIN + minutes`.
pub fn minutes_after_origin(minutes: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ORIGIN + minutes * 60)
        .expect("valid time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

impl Entry {
    /// Question `n` of a Q&A site's newest-questions feed, asked `n` minutes after the origin.
    pub fn question(n: u32) -> Entry {
        let at = minutes_after_origin(i64::from(n));
        Entry {
            id: format!("https://qa.example/q/{n}"),
            title: format!("Question {n}: why does my poller miss entries?"),
            author: format!("asker{n}"),
            link: format!("https://qa.example/questions/{n}/why-does-my-poller-miss-entries"),
            published: at.clone(),
            updated: at,
            summary: format!("<p>Body of question <b>{n}</b></p>"),
            categories: vec!["rust".into(), format!("tag-{n}")],
        }
    }
}

/// Questions `range`, newest first (the order a newest-questions feed lists them).
pub fn questions(range: std::ops::RangeInclusive<u32>) -> Vec<Entry> {
    range.rev().map(Entry::question).collect()
}

/// A request as the feed server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// Header names lowercase.
    pub headers: HashMap<String, String>,
    pub at: Instant,
    /// The status answered.
    pub status: u16,
    /// The window version served (sliding-window feeds only).
    pub version: Option<u64>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One sliding-window Atom feed.
struct Window {
    entries: Vec<Entry>,
    version: u64,
    etag: bool,
    last_modified: bool,
    /// Answer this status instead of the feed.
    failure: Option<u16>,
}

impl Window {
    fn etag_value(&self) -> String {
        format!("\"w{}\"", self.version)
    }

    /// A synthetic modification time that grows with every version.
    fn last_modified_value(&self) -> String {
        let unix = ORIGIN + i64::try_from(self.version).unwrap_or(0) * 60;
        http_date(unix)
    }
}

fn http_date(unix: i64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(unix)
        .expect("valid time")
        .format(&format)
        .expect("format")
}

#[derive(Default)]
struct Shared {
    windows: Mutex<HashMap<String, Window>>,
    requests: Mutex<Vec<Recorded>>,
}

pub struct FeedServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FeedServer {
    pub async fn start() -> FeedServer {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the feed server");
        let addr = listener.local_addr().expect("feed server address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FeedServer { addr, shared, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the entries of the Atom feed at `/atom/{name}` (document order, newest first);
    /// every call is a new version (new ETag and Last-Modified).
    pub fn set_entries(&self, name: &str, entries: Vec<Entry>) {
        let mut windows = self.shared.windows.lock().unwrap();
        let w = windows.entry(name.to_owned()).or_insert_with(|| Window {
            entries: Vec::new(),
            version: 0,
            etag: true,
            last_modified: true,
            failure: None,
        });
        w.entries = entries;
        w.version += 1;
    }

    /// Which validators `/atom/{name}` sends (and honours).
    pub fn set_validators(&self, name: &str, etag: bool, last_modified: bool) {
        let mut windows = self.shared.windows.lock().unwrap();
        let w = windows.get_mut(name).expect("set_entries first");
        w.etag = etag;
        w.last_modified = last_modified;
    }

    /// Makes `/atom/{name}` answer `status` (None: the feed again).
    pub fn set_failure(&self, name: &str, status: Option<u16>) {
        let mut windows = self.shared.windows.lock().unwrap();
        windows.get_mut(name).expect("set_entries first").failure = status;
    }

    pub fn version(&self, name: &str) -> u64 {
        self.shared.windows.lock().unwrap()[name].version
    }

    pub fn etag(&self, name: &str) -> String {
        self.shared.windows.lock().unwrap()[name].etag_value()
    }

    pub fn last_modified(&self, name: &str) -> String {
        self.shared.windows.lock().unwrap()[name].last_modified_value()
    }

    /// Every request to `path`, oldest first.
    pub fn requests(&self, path: &str) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` has had at least `n` requests; returns them all.
    pub async fn wait_requests(&self, path: &str, n: usize) -> Vec<Recorded> {
        tokio::time::timeout(WAIT, async {
            loop {
                let seen = self.requests(path);
                if seen.len() >= n {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {n} request(s) to {path}"))
    }

    /// Waits for the first request to `path` that was served window version `version` or
    /// later, then for the request after it — by then the poll that fetched that version has
    /// been fully handled (each feed polls sequentially). Returns (that request, the next).
    pub async fn wait_version_handled(&self, path: &str, version: u64) -> (Recorded, Recorded) {
        tokio::time::timeout(WAIT, async {
            loop {
                let seen = self.requests(path);
                if let Some(i) = seen
                    .iter()
                    .position(|r| r.version.is_some_and(|v| v >= version))
                {
                    if let Some(next) = seen.get(i + 1) {
                        return (seen[i].clone(), next.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {path} version {version} to be handled"))
    }
}

// ---- Documents ----------------------------------------------------------------------------

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An Atom document in the style of a Q&A site's newest-questions feed.
pub fn atom(title: &str, entries: &[Entry]) -> String {
    let mut doc = String::from(
        r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:creativeCommons="http://backend.userland.com/creativeCommonsRssModule" xmlns:re="http://purl.org/atompub/rank/1.0">
    <title type="text">"#,
    );
    doc.push_str(&xml_escape(title));
    doc.push_str(
        r#"</title>
    <link rel="self" href="https://qa.example/feeds" type="application/atom+xml" />
    <link rel="alternate" href="https://qa.example/questions" type="text/html" />
    <subtitle>most recent 30 from qa.example</subtitle>
    <updated>2024-03-01T12:00:00Z</updated>
    <id>https://qa.example/feeds</id>
    <creativeCommons:license>https://creativecommons.org/licenses/by-sa/4.0/rdf</creativeCommons:license>
"#,
    );
    for e in entries {
        doc.push_str("    <entry>\n");
        if !e.id.is_empty() {
            doc.push_str(&format!("        <id>{}</id>\n", xml_escape(&e.id)));
        }
        doc.push_str("        <re:rank scheme=\"https://qa.example\">0</re:rank>\n");
        doc.push_str(&format!(
            "        <title type=\"text\">{}</title>\n",
            xml_escape(&e.title)
        ));
        for c in &e.categories {
            doc.push_str(&format!(
                "        <category scheme=\"https://qa.example/tags\" term=\"{}\" />\n",
                xml_escape(c)
            ));
        }
        doc.push_str(&format!(
            "        <author>\n            <name>{}</name>\n            <uri>https://qa.example/users/1/{}</uri>\n        </author>\n",
            xml_escape(&e.author),
            xml_escape(&e.author)
        ));
        doc.push_str(&format!(
            "        <link rel=\"alternate\" href=\"{}\" />\n",
            xml_escape(&e.link)
        ));
        doc.push_str(&format!(
            "        <published>{}</published>\n        <updated>{}</updated>\n",
            e.published, e.updated
        ));
        doc.push_str(&format!(
            "        <summary type=\"html\">{}</summary>\n",
            xml_escape(&e.summary)
        ));
        doc.push_str("    </entry>\n");
    }
    doc.push_str("</feed>\n");
    doc
}

/// The titles of the ISO-8859-1 RSS feed, newest first.
pub const LATIN1_TITLES: [&str; 3] = [
    "Straße gesperrt: Umleitung über die Brücke",
    "Grüße aus Köln",
    "Café crème et déjà-vu",
];

/// An RSS 2.0 document encoded as ISO-8859-1; `declare` puts the encoding in the XML
/// declaration.
pub fn rss_latin1(declare: bool) -> Vec<u8> {
    let declaration = if declare {
        r#"<?xml version="1.0" encoding="ISO-8859-1"?>"#
    } else {
        r#"<?xml version="1.0"?>"#
    };
    let mut doc = format!(
        "{declaration}\n<rss version=\"2.0\"><channel><title>Nachrichten für Björn</title>\
         <link>https://news.example/</link><description>Neuigkeiten</description>\n"
    );
    for (i, title) in LATIN1_TITLES.iter().enumerate() {
        let n = LATIN1_TITLES.len() - i;
        doc.push_str(&format!(
            "<item><title>{}</title><link>https://news.example/{n}</link>\
             <guid isPermaLink=\"false\">latin1-{n}</guid><author>redaktion@news.example (Jürgen Müller)</author>\
             <pubDate>Fri, 01 Mar 2024 1{n}:00:00 GMT</pubDate><category>Größe</category>\
             <description>Ä Ö Ü ä ö ü ß é</description></item>\n",
            xml_escape(title)
        ));
    }
    doc.push_str("</channel></rss>\n");
    latin1(&doc)
}

/// Encodes text that only uses U+0000..U+00FF as ISO-8859-1.
pub fn latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).expect("a Latin-1 character"))
        .collect()
}

/// A JSON Feed 1.1 document (newest first).
pub fn json_feed() -> String {
    serde_json::json!({
        "version": "https://jsonfeed.org/version/1.1",
        "title": "JSON questions",
        "home_page_url": "https://json.example/",
        "feed_url": "https://json.example/feed.json",
        "authors": [{"name": "The JSON desk"}],
        "items": [
            {
                "id": "json-2",
                "url": "https://json.example/q/2",
                "title": "Second JSON question",
                "summary": "two",
                "content_html": "<p>two, in full</p>",
                "date_published": "2024-03-02T11:00:00+01:00",
                "date_modified": "2024-03-02T12:30:00+01:00",
                "authors": [{"name": "Zoë"}],
                "tags": ["json", "feeds"]
            },
            {
                "id": "json-1",
                "url": "https://json.example/q/1",
                "title": "First JSON question",
                "content_text": "one",
                "date_published": "2024-03-01T10:00:00Z",
                "authors": [{"name": "Yann"}],
                "tags": []
            }
        ]
    })
    .to_string()
}

/// The entries of the compressed feeds.
pub fn compressed_entries(kind: &str) -> Vec<Entry> {
    (1..=3)
        .rev()
        .map(|n| {
            let mut e = Entry::question(n);
            e.id = format!("https://qa.example/{kind}/{n}");
            e.title = format!("{kind} question {n}");
            e
        })
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("deflate");
    enc.finish().expect("deflate")
}

fn brotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        enc.write_all(bytes).expect("brotli");
    }
    out
}

// ---- Routing ------------------------------------------------------------------------------

/// The size of `/huge`: 50 MiB.
pub const HUGE: usize = 50 * 1024 * 1024;

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let at = Instant::now();
    let (response, version) = route(&shared, &path, req.headers());
    shared.requests.lock().unwrap().push(Recorded {
        path,
        headers,
        at,
        status: response.status().as_u16(),
        version,
    });
    response
}

fn respond(status: u16, headers: &[(&str, String)], body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    for (k, v) in headers {
        r.headers_mut().insert(
            header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    r
}

const ATOM: &str = "application/atom+xml; charset=utf-8";

fn route(shared: &Shared, path: &str, headers: &HeaderMap) -> (Response, Option<u64>) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ct = |v: &str| ("content-type", v.to_owned());
    let response = match segments.as_slice() {
        ["atom", name] => return sliding_window(shared, name, headers),
        ["latin1", "decl"] => respond(200, &[ct("application/rss+xml")], rss_latin1(true)),
        ["latin1", "header"] => respond(
            200,
            &[ct("text/xml; charset=ISO-8859-1")],
            rss_latin1(false),
        ),
        ["json"] => respond(200, &[ct("application/feed+json")], json_feed()),
        ["gzip"] => respond(
            200,
            &[ct(ATOM), ("content-encoding", "gzip".into())],
            gzip(atom("gzip", &compressed_entries("gzip")).as_bytes()),
        ),
        ["deflate"] => respond(
            200,
            &[ct(ATOM), ("content-encoding", "deflate".into())],
            zlib(atom("deflate", &compressed_entries("deflate")).as_bytes()),
        ),
        ["br"] => respond(
            200,
            &[ct(ATOM), ("content-encoding", "br".into())],
            brotli(atom("br", &compressed_entries("br")).as_bytes()),
        ),
        ["garbage"] => {
            // Deterministic pseudo-random bytes.
            let mut x: u32 = 0x1234_5678;
            let bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x >> 24) as u8
                })
                .collect();
            respond(200, &[ct("application/rss+xml")], bytes)
        }
        ["html"] => respond(
            200,
            &[ct("text/html; charset=utf-8")],
            "<!DOCTYPE html>\n<html><head><title>Welcome</title></head>\
             <body><h1>This is a web page, not a feed</h1><p>Try again later.</p></body></html>\n",
        ),
        ["empty"] => respond(200, &[ct("application/rss+xml")], ""),
        ["huge"] => respond(200, &[ct("application/rss+xml")], huge_body()),
        ["huge-declared"] => respond(
            200,
            &[
                ct("application/rss+xml"),
                ("content-length", HUGE.to_string()),
            ],
            huge_body(),
        ),
        ["gzip-bomb"] => {
            // 11 MiB of whitespace inside a feed, about 11 KiB on the wire.
            let mut doc = Vec::with_capacity(11 * 1024 * 1024 + 200);
            doc.extend_from_slice(
                b"<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>bomb</title><description>",
            );
            doc.resize(11 * 1024 * 1024, b' ');
            doc.extend_from_slice(b"</description></channel></rss>");
            respond(
                200,
                &[
                    ct("application/rss+xml"),
                    ("content-encoding", "gzip".into()),
                ],
                gzip(&doc),
            )
        }
        ["slow"] => respond(200, &[ct("application/rss+xml")], slow_body()),
        ["loop", which] => {
            let to = if *which == "a" { "/loop/b" } else { "/loop/a" };
            respond(302, &[("location", to.into())], "")
        }
        ["chain", n] => match n.parse::<u32>() {
            Ok(0) => respond(
                200,
                &[ct(ATOM)],
                atom("end of the chain", &compressed_entries("chain")),
            ),
            Ok(n) => respond(302, &[("location", format!("/chain/{}", n - 1))], ""),
            Err(_) => respond(404, &[], ""),
        },
        // Feeds that ask to be polled less often.
        ["ttl"] => respond(
            200,
            &[ct("application/rss+xml")],
            "<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>ttl</title>\
             <link>https://ttl.example/</link><description>d</description><ttl>1</ttl>\
             <item><title>Cached for a minute</title><guid>ttl-1</guid></item></channel></rss>",
        ),
        ["max-age"] => respond(
            200,
            &[ct(ATOM), ("cache-control", "public, max-age=120".into())],
            atom("max-age", &compressed_entries("max-age")),
        ),
        ["retry-date"] => {
            // Retry-After as an HTTP date, at least 4 s from now.
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            respond(503, &[("retry-after", http_date(now + 5))], "busy")
        }
        // A feed that moved: relative links resolve against where it lives now.
        ["moved"] => respond(301, &[("location", "/new/place/feed".into())], ""),
        ["new", "place", "feed"] => {
            let mut e = Entry::question(1);
            e.link = "q/1".into();
            respond(200, &[ct(ATOM)], atom("moved", &[e]))
        }
        ["bad-utf8"] => {
            // Declared UTF-8, written in Latin-1.
            let doc = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<rss version=\"2.0\"><channel>\
                       <title>Mislabelled</title><link>https://bad.example/</link><description>x</description>\
                       <item><title>Café société</title><link>https://bad.example/1</link>\
                       <guid>bad-utf8-1</guid></item></channel></rss>\n";
            respond(
                200,
                &[ct("application/rss+xml; charset=utf-8")],
                latin1(doc),
            )
        }
        ["status", code] => {
            let code: u16 = code.parse().unwrap_or(500);
            let mut extra = vec![ct("text/plain")];
            if code == 429 || code == 503 {
                extra.push(("retry-after", "3".into()));
            }
            respond(code, &extra, "not now")
        }
        _ => respond(404, &[ct("text/plain")], "no such feed"),
    };
    (response, None)
}

fn sliding_window(shared: &Shared, name: &str, headers: &HeaderMap) -> (Response, Option<u64>) {
    let windows = shared.windows.lock().unwrap();
    let Some(w) = windows.get(name) else {
        return (respond(404, &[], "no such window"), None);
    };
    if let Some(status) = w.failure {
        let mut extra = vec![];
        if status == 429 || status == 503 {
            extra.push(("retry-after", "3".to_owned()));
        }
        return (
            respond(status, &extra, "failing on purpose"),
            Some(w.version),
        );
    }
    let etag = w.etag_value();
    let last_modified = w.last_modified_value();
    let mut validators = vec![];
    if w.etag {
        validators.push(("etag", etag.clone()));
    }
    if w.last_modified {
        validators.push(("last-modified", last_modified.clone()));
    }
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // RFC 9110 §13.2.2: If-None-Match, when present, decides; else If-Modified-Since.
    let not_modified = match header_text(header::IF_NONE_MATCH) {
        Some(inm) if w.etag => inm.split(',').any(|t| t.trim() == etag || t.trim() == "*"),
        _ => {
            w.last_modified
                && header_text(header::IF_MODIFIED_SINCE).is_some_and(|ims| ims == last_modified)
        }
    };
    if not_modified {
        return (respond(304, &validators, Body::empty()), Some(w.version));
    }
    let mut all = validators;
    all.push(("content-type", ATOM.into()));
    let body = atom(&format!("Newest questions - {name}"), &w.entries);
    (respond(200, &all, body), Some(w.version))
}

/// 50 MiB of an RSS document that never closes, in 64 KiB chunks (one shared buffer).
fn huge_body() -> Body {
    let prefix: &[u8] =
        b"<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>huge</title><description>";
    let mut first = vec![b'x'; 64 * 1024];
    first[..prefix.len()].copy_from_slice(prefix);
    let first = Bytes::from(first);
    let filler = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = HUGE / (64 * 1024);
    let stream = futures_util::stream::iter((0..chunks).map(move |i| {
        Ok::<_, Infallible>(if i == 0 {
            first.clone()
        } else {
            filler.clone()
        })
    }));
    Body::from_stream(stream)
}

/// An RSS document that arrives one byte every 100 ms, forever.
fn slow_body() -> Body {
    let prefix: &'static [u8] = b"<?xml version=\"1.0\"?><rss version=\"2.0\"><channel>";
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let byte = prefix.get(i).copied().unwrap_or(b' ');
        Some((Ok::<_, Infallible>(Bytes::copy_from_slice(&[byte])), i + 1))
    });
    Body::from_stream(stream)
}
