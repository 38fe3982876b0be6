//! Feed parsing: RSS 0.9x/1.0/2.0, Atom 0.3/1.0 and JSON Feed bytes into Tidings entries (pure, no I/O).
//!
//! [`parse_feed`] turns a fetched body into a [`ParsedFeed`]; [`entry_data`] is the `data` of
//! the `entry` message SPEC §4 publishes; [`order_oldest_first`] is the publish order.
//!
//! How a document is read:
//!
//! 1. **Decoding.** A byte-order mark wins, then the charset of the HTTP `Content-Type`, then
//!    the XML declaration's `encoding`, then UTF-8; a body that is not valid in the declared
//!    encoding is read as UTF-8, else as windows-1252, so a mislabelled feed is still read.
//!    The text handed on is UTF-8 with the declaration's `encoding` removed.
//! 2. **Repair.** A bare `&` (not starting an entity or character reference) becomes `&amp;`
//!    and the HTML entities XML does not know (`&nbsp;`, `&eacute;` …) become character
//!    references, outside CDATA sections and comments — otherwise one stray `&` in a title
//!    loses the whole feed.
//! 3. **Parsing.** `feed-rs` parses the document, inside `catch_unwind` (it has panicked on
//!    odd input) and with Tidings' own date parser. Before that, the gaps it has are closed:
//!    `<rss>` without a version (or with 0.90/0.93/0.94) is given `version="2.0"`, Atom 0.3 and
//!    RSS 0.90/Userland namespaces are mapped to the ones it knows, and its id generator is
//!    replaced by one that generates nothing, so an entry without a guid/id has no id instead
//!    of a random one that changes on every parse.
//! 4. **Source scan.** The same text is also read into a small element tree (quick-xml, the
//!    XML reader feed-rs itself uses), which is what the document *says*: whether an entry has
//!    a guid/id at all, the title's declared type, which element a date came from (feed-rs
//!    copies an RSS `pubDate` into `updated`), `xml:base` on every element, Atom 0.3 and
//!    RSS 1.0 names, the link rules of the common feed readers (an alternate HTML link, else
//!    the RSS `<link>`, else a permalink guid). Entry fields come from the scan; feed-rs
//!    contributes the summary/content and categories, and carries the whole result when the
//!    scan cannot read the document. JSON Feed is read by feed-rs alone.
//!
//! Titles are plain text: HTML is stripped and entities decoded when the title is HTML (Atom
//! `type="html"`, Atom 0.3 `text/html`, or an RSS title that looks like HTML). Links are made
//! absolute against `xml:base` and the document URL. Times are RFC 3339 UTC to the second.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

/// A feed document as Tidings uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedFeed {
    /// The feed's own title, plain text.
    pub title: Option<String>,
    /// RSS `<ttl>`: how long the publisher asks readers to cache the feed.
    pub ttl: Option<Duration>,
    /// The entries in document order (feeds usually list the newest first).
    pub entries: Vec<FeedEntry>,
}

/// One entry (RSS item, Atom entry, JSON Feed item).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeedEntry {
    /// Dedupe key: lowercase hex SHA-256 of the guid/id, else of the link, else of title + content.
    pub key: String,
    /// The id as the feed writes it (RSS guid, Atom id, JSON Feed id), or None.
    pub id: Option<String>,
    /// Plain text.
    pub title: Option<String>,
    /// Absolute.
    pub link: Option<String>,
    /// The author's name.
    pub author: Option<String>,
    /// RFC 3339 UTC, e.g. `2026-11-22T10:00:00Z`.
    pub published: Option<String>,
    /// RFC 3339 UTC.
    pub updated: Option<String>,
    /// The summary (or, lacking one, the content) as the feed gives it, HTML included.
    pub summary: Option<String>,
    pub categories: Vec<String>,
}

/// Why a body could not be read as a feed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("the feed body is empty")]
    Empty,
    #[error("not a feed: {0}")]
    NotAFeed(String),
    #[error("the feed could not be parsed: {0}")]
    Malformed(String),
    #[error("the feed parser failed on this document: {0}")]
    Panicked(String),
}

/// Parses a fetched feed body. `content_type` is the HTTP `Content-Type` (its charset is
/// honoured); `base_url` is the URL the body was fetched from (relative links resolve
/// against it).
pub fn parse_feed(
    body: &[u8],
    content_type: Option<&str>,
    base_url: &str,
) -> Result<ParsedFeed, FeedError> {
    // Belt and braces: everything below is meant not to panic, and the feed-rs call has its
    // own guard, but one malformed document must never take the poller down.
    match catch_unwind(AssertUnwindSafe(|| {
        parse_unguarded(body, content_type, base_url)
    })) {
        Ok(result) => result,
        Err(panic) => Err(FeedError::Panicked(panic_text(panic.as_ref()))),
    }
}

/// The `data` of the `entry` message for this entry (SPEC §4).
pub fn entry_data(entry: &FeedEntry, feed_name: &str) -> Value {
    json!({
        "id": entry.id,
        "title": entry.title,
        "link": entry.link,
        "author": entry.author,
        "published": entry.published,
        "updated": entry.updated,
        "summary": entry.summary,
        "categories": entry.categories,
        "feed": feed_name,
    })
}

/// Puts entries in publish order, oldest first. Feeds list the newest first, so the document
/// order is reversed; then the entries that carry a time (published, else updated) are sorted
/// by it among the places they occupy, and those without one keep their (reversed) place.
pub fn order_oldest_first(entries: &mut Vec<FeedEntry>) {
    entries.reverse();
    let slots: Vec<usize> = (0..entries.len())
        .filter(|&i| entry_time(&entries[i]).is_some())
        .collect();
    let mut dated: Vec<FeedEntry> = slots
        .iter()
        .map(|&i| std::mem::take(&mut entries[i]))
        .collect();
    // Stable: equal times keep the reversed document order.
    dated.sort_by(|a, b| entry_time(a).cmp(&entry_time(b)));
    for (slot, entry) in slots.into_iter().zip(dated) {
        entries[slot] = entry;
    }
}

// The times are all `YYYY-MM-DDTHH:MM:SSZ`, so they order as strings.
fn entry_time(entry: &FeedEntry) -> Option<&str> {
    entry.published.as_deref().or(entry.updated.as_deref())
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

fn parse_unguarded(
    body: &[u8],
    content_type: Option<&str>,
    base_url: &str,
) -> Result<ParsedFeed, FeedError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(FeedError::Empty);
    }
    let body_no_bom = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let first = body_no_bom.iter().find(|b| !b.is_ascii_whitespace());
    let json_type = content_type.is_some_and(|ct| media_type(ct).contains("json"));
    if first == Some(&b'{') || (json_type && first != Some(&b'<')) {
        return parse_json_feed(body_no_bom, base_url);
    }

    let text = decode(body, content_type);
    let clean = repair_xml(&text);

    let scanned = scan_document(&clean, base_url);
    let from_feed_rs = run_feed_rs(prepare_for_feed_rs(&clean).as_bytes(), base_url);

    match (scanned, from_feed_rs) {
        (Ok(raw), Ok(feed)) => Ok(merge(raw, Some(&feed))),
        (Ok(raw), Err(_)) => Ok(merge(raw, None)),
        (Err(_), Ok(feed)) => Ok(from_feed_rs_model(&feed, base_url)),
        (Err(scan_err), Err(fr_err)) => Err(match scan_err {
            ScanError::NotAFeed(what) => FeedError::NotAFeed(what),
            ScanError::Malformed(what) => FeedError::Malformed(format!("{what}; {fr_err}")),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// feed-rs

/// Runs feed-rs on UTF-8 text with Tidings' date parser and no id generation; a panic inside
/// feed-rs becomes an error.
fn run_feed_rs(text: &[u8], base_url: &str) -> Result<feed_rs::model::Feed, FeedError> {
    let base = Url::parse(base_url).ok().map(|u| u.to_string());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        feed_rs::parser::Builder::new()
            .base_uri(base.as_deref())
            // feed-rs fills a missing id with a hash of link + title or, lacking those, a
            // random UUID. An id must be what the document says, so generate none: an empty
            // id afterwards means "the document has no id".
            .id_generator(|_, _, _| String::new())
            .timestamp_parser(|text| {
                parse_date(text).and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
            })
            .build()
            .parse(text)
    }));
    match outcome {
        Ok(Ok(feed)) => Ok(feed),
        Ok(Err(e)) => Err(FeedError::Malformed(e.to_string())),
        Err(panic) => Err(FeedError::Panicked(panic_text(panic.as_ref()))),
    }
}

/// Closes feed-rs's known gaps on an already decoded and repaired document: the RSS versions
/// it rejects and the namespaces it does not recognise.
fn prepare_for_feed_rs(text: &str) -> String {
    let mut out = text.to_string();
    for (old, new) in [
        (NS_ATOM03, NS_ATOM10),
        (NS_RSS090, NS_RSS10),
        (NS_RSS_USERLAND, NS_RSS10),
        (NS_RSS_HARVARD, NS_RSS10),
    ] {
        for quote in ['"', '\''] {
            let from = format!("{quote}{old}{quote}");
            if out.contains(&from) {
                out = out.replace(&from, &format!("{quote}{new}{quote}"));
            }
        }
    }
    fix_rss_version(&out)
}

/// feed-rs accepts `<rss>` only with version "2.0", "0.91", "0.92" or an empty one; every other
/// RSS 0.9x/2.x is read the same way, so give it "2.0".
fn fix_rss_version(text: &str) -> String {
    let Some((start, end)) = root_start_tag(text) else {
        return text.to_string();
    };
    let tag = &text[start..end];
    let name_end = tag[1..]
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .map_or(tag.len(), |i| i + 1);
    if !tag[1..name_end].eq_ignore_ascii_case("rss") {
        return text.to_string();
    }
    let version = attr_in_tag(tag, "version");
    if matches!(version.as_deref(), Some("2.0") | Some("0.91") | Some("0.92")) {
        return text.to_string();
    }
    let mut new_tag = String::with_capacity(tag.len() + 16);
    new_tag.push_str("<rss version=\"2.0\"");
    let rest = remove_attr_from_tag(&tag[name_end..], "version");
    if !rest.starts_with(char::is_whitespace) && !rest.starts_with('>') && !rest.starts_with('/')
    {
        new_tag.push(' ');
    }
    new_tag.push_str(&rest);
    format!("{}{}{}", &text[..start], new_tag, &text[end..])
}

/// Byte range of the root element's start tag (`<name ...>`).
fn root_start_tag(text: &str) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        if rest.starts_with("<?") {
            i += rest.find("?>").map_or(bytes.len() - i, |e| e + 2);
        } else if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(bytes.len() - i, |e| e + 3);
        } else if rest.starts_with("<!") {
            // DOCTYPE, possibly with an internal subset in brackets.
            let close = match (rest.find('['), rest.find('>')) {
                (Some(b), Some(g)) if b < g => rest.find("]>").map(|e| e + 2),
                (_, Some(g)) => Some(g + 1),
                _ => None,
            };
            i += close.unwrap_or(bytes.len() - i);
        } else {
            let end = tag_end(rest)?;
            return Some((i, i + end));
        }
    }
    None
}

/// Length of a start tag up to and including its `>`, skipping quoted attribute values.
fn tag_end(tag: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in tag.char_indices() {
        match (quote, c) {
            (None, '"') | (None, '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

fn attr_in_tag(tag: &str, name: &str) -> Option<String> {
    attr_span(tag, name).map(|(_, _, value)| value)
}

fn remove_attr_from_tag(tag: &str, name: &str) -> String {
    match attr_span(tag, name) {
        Some((start, end, _)) => format!("{}{}", &tag[..start], &tag[end..]),
        None => tag.to_string(),
    }
}

/// (start, end, value) of attribute `name` in a start tag (start includes leading whitespace).
fn attr_span(tag: &str, name: &str) -> Option<(usize, usize, String)> {
    let bytes = tag.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            let ws_start = i;
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let name_start = i;
            while i < bytes.len()
                && !bytes[i].is_ascii_whitespace()
                && !matches!(bytes[i], b'=' | b'>' | b'/')
            {
                i += 1;
            }
            let attr_name = &tag[name_start..i];
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'=' {
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                if i < bytes.len() && (bytes[i] == b'"' || bytes[i] == b'\'') {
                    let q = bytes[i];
                    let value_start = i + 1;
                    let value_end = tag[value_start..]
                        .find(q as char)
                        .map_or(tag.len(), |e| value_start + e);
                    i = (value_end + 1).min(tag.len());
                    if attr_name == name {
                        return Some((ws_start, i, tag[value_start..value_end].to_string()));
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Builds the result from feed-rs alone (JSON Feed, or XML the source scan could not read).
fn from_feed_rs_model(feed: &feed_rs::model::Feed, base_url: &str) -> ParsedFeed {
    let entries = feed
        .entries
        .iter()
        .map(|e| {
            let link = e
                .links
                .iter()
                .find(|l| l.rel.as_deref().is_none_or(|r| r == "alternate"))
                .or_else(|| e.links.first())
                .map(|l| resolve_url(base_url, &l.href));
            let mut entry = FeedEntry {
                key: String::new(),
                id: Some(e.id.trim().to_string()).filter(|s| !s.is_empty()),
                title: e.title.as_ref().and_then(feed_rs_text_plain),
                link: link.filter(|s| !s.is_empty()),
                author: e
                    .authors
                    .iter()
                    .find_map(|p| p.name.as_deref().map(collapse_ws))
                    .filter(|s| !s.is_empty()),
                published: e.published.map(|t| format_rfc3339(t.timestamp())),
                updated: e.updated.map(|t| format_rfc3339(t.timestamp())),
                summary: feed_rs_summary(e),
                categories: e.categories.iter().map(|c| c.term.clone()).collect(),
            };
            entry.key = entry_key(&entry);
            entry
        })
        .collect();
    ParsedFeed {
        title: feed.title.as_ref().and_then(feed_rs_text_plain),
        ttl: feed.ttl.map(|m| Duration::from_secs(u64::from(m) * 60)),
        entries,
    }
}

fn feed_rs_text_plain(text: &feed_rs::model::Text) -> Option<String> {
    let subtype = text.content_type.subty().as_str().to_ascii_lowercase();
    let plain = if subtype == "html" || subtype == "xhtml+xml" {
        html_to_text(&text.content)
    } else {
        text.content.clone()
    };
    Some(collapse_ws(&plain)).filter(|s| !s.is_empty())
}

fn feed_rs_summary(e: &feed_rs::model::Entry) -> Option<String> {
    e.summary
        .as_ref()
        .map(|s| s.content.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            e.content
                .as_ref()
                .and_then(|c| c.body.as_deref())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
}

/// The dedupe key: SHA-256 (hex) of the id, else the link, else title + content.
fn entry_key(entry: &FeedEntry) -> String {
    let material = match (&entry.id, &entry.link) {
        (Some(id), _) => format!("id:{id}"),
        (None, Some(link)) => format!("link:{link}"),
        (None, None) => format!(
            "text:{}\n{}",
            entry.title.as_deref().unwrap_or(""),
            entry.summary.as_deref().unwrap_or("")
        ),
    };
    // The prefixes keep an id from colliding with an equal link of another entry.
    let digest = Sha256::digest(material.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

// ---------------------------------------------------------------------------------------------
// JSON Feed

fn parse_json_feed(body: &[u8], base_url: &str) -> Result<ParsedFeed, FeedError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| FeedError::Malformed(format!("invalid JSON: {e}")))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(FeedError::NotAFeed("JSON that is not an object".into()));
    };
    if !obj.contains_key("items") && !obj.contains_key("version") {
        return Err(FeedError::NotAFeed("JSON without JSON Feed items".into()));
    }
    // feed-rs requires a 1.x version, a title, and string ids; JSON Feed 1.0 allowed numbers.
    let version_ok = obj
        .get("version")
        .and_then(Value::as_str)
        .is_some_and(|v| v.starts_with("https://jsonfeed.org/version/1"));
    if !version_ok {
        obj.insert("version".into(), json!("https://jsonfeed.org/version/1.1"));
    }
    if !obj.get("title").is_some_and(Value::is_string) {
        obj.insert("title".into(), json!(""));
    }
    if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(id) = item.get("id").filter(|id| id.is_number()).cloned() {
                item.insert("id".into(), json!(id.to_string()));
            }
        }
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| FeedError::Malformed(e.to_string()))?;
    let feed = run_feed_rs(&bytes, base_url)?;
    Ok(from_feed_rs_model(&feed, base_url))
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Decodes a body to text: BOM, then the HTTP charset, then the XML declaration, then UTF-8.
/// Also drops the BOM and the declaration's `encoding` (the text is UTF-8 now).
fn decode(body: &[u8], content_type: Option<&str>) -> String {
    let text = decode_bytes(body, content_type);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    strip_declared_encoding(text)
}

fn decode_bytes(body: &[u8], content_type: Option<&str>) -> String {
    // 1. Byte-order marks and the UTF-16/32 shapes of "<?" — these are unambiguous.
    if let Some(rest) = body.strip_prefix(b"\x00\x00\xFE\xFF") {
        return decode_utf32(rest, true);
    }
    if let Some(rest) = body.strip_prefix(b"\xFF\xFE\x00\x00") {
        return decode_utf32(rest, false);
    }
    if let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        return String::from_utf8_lossy(rest).into_owned();
    }
    if let Some(rest) = body.strip_prefix(b"\xFE\xFF") {
        return encoding_rs::UTF_16BE.decode_without_bom_handling(rest).0.into_owned();
    }
    if let Some(rest) = body.strip_prefix(b"\xFF\xFE") {
        return encoding_rs::UTF_16LE.decode_without_bom_handling(rest).0.into_owned();
    }
    if body.starts_with(b"\x00\x00\x00\x3C") {
        return decode_utf32(body, true);
    }
    if body.starts_with(b"\x3C\x00\x00\x00") {
        return decode_utf32(body, false);
    }
    if body.starts_with(b"\x00\x3C\x00") {
        return encoding_rs::UTF_16BE.decode_without_bom_handling(body).0.into_owned();
    }
    if body.starts_with(b"\x3C\x00") && body.get(3) == Some(&0) {
        return encoding_rs::UTF_16LE.decode_without_bom_handling(body).0.into_owned();
    }

    // 2. The HTTP charset, then 3. the XML declaration.
    let declared = content_type
        .and_then(http_charset)
        .or_else(|| xml_declared_encoding(body));
    if let Some(label) = declared {
        if let Some(text) = decode_with_label(body, &label) {
            return text;
        }
    }
    // 4. UTF-8, else windows-1252 (which reads any byte).
    match std::str::from_utf8(body) {
        Ok(s) => s.to_string(),
        Err(_) => encoding_rs::WINDOWS_1252
            .decode_without_bom_handling(body)
            .0
            .into_owned(),
    }
}

/// Decodes with a named encoding; None when the label is unknown or the bytes are invalid in it.
fn decode_with_label(body: &[u8], label: &str) -> Option<String> {
    let label = label.trim().to_ascii_lowercase();
    match label.as_str() {
        "utf-32" | "utf-32be" | "ucs-4" | "ucs-4be" => return Some(decode_utf32(body, true)),
        "utf-32le" | "ucs-4le" => return Some(decode_utf32(body, false)),
        // Without a BOM (those were handled before) a document that claims UTF-16 but does
        // not look like it is read as the ASCII-compatible text it is.
        "utf-16" | "ucs-2" | "utf-16be" | "utf-16le" => return None,
        _ => {}
    }
    let alias = match label.as_str() {
        "cp1252" => "windows-1252",
        "cp1251" => "windows-1251",
        "cp1250" => "windows-1250",
        "latin-1" | "iso8859-1" | "iso_8859_1" => "iso-8859-1",
        "utf8" => "utf-8",
        "euc_kr" => "euc-kr",
        "shift_jis" | "sjis" | "shift-jis" => "shift_jis",
        other => other,
    };
    let encoding = encoding_rs::Encoding::for_label(alias.as_bytes())?;
    if encoding == encoding_rs::UTF_16BE || encoding == encoding_rs::UTF_16LE {
        return None;
    }
    encoding
        .decode_without_bom_handling_and_without_replacement(body)
        .map(|c| c.into_owned())
}

fn decode_utf32(body: &[u8], big_endian: bool) -> String {
    body.chunks_exact(4)
        .map(|c| {
            let n = if big_endian {
                u32::from_be_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            };
            char::from_u32(n).unwrap_or('\u{fffd}')
        })
        .collect()
}

/// The media type of a `Content-Type` value, lowercase, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The `charset` parameter of a `Content-Type` value, unquoted.
fn http_charset(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (key, value) = param.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("charset") {
            return None;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'').trim();
        Some(value.to_string()).filter(|v| !v.is_empty())
    })
}

/// The `encoding` of an XML declaration at the start of an ASCII-compatible body.
fn xml_declared_encoding(body: &[u8]) -> Option<String> {
    let head = &body[..body.len().min(512)];
    let head = String::from_utf8_lossy(head);
    let head = head.trim_start();
    if !head.starts_with("<?xml") {
        return None;
    }
    let decl = &head[..head.find("?>")?];
    attr_in_tag(decl, "encoding").filter(|e| !e.trim().is_empty())
}

/// Rewrites the XML declaration without its `encoding`: the text is UTF-8 from here on, and
/// XML readers would otherwise decode it a second time.
fn strip_declared_encoding(text: &str) -> String {
    let lead = text.len() - text.trim_start().len();
    let rest = &text[lead..];
    if !rest.starts_with("<?xml") {
        return text.to_string();
    }
    match rest.find("?>") {
        Some(end) => {
            let decl = &rest[..end];
            let version = attr_in_tag(decl, "version").unwrap_or_else(|| "1.0".into());
            format!("<?xml version=\"{version}\"?>{}", &rest[end + 2..])
        }
        None => text.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Repair

/// Escapes bare `&` and turns HTML-only named entities into character references, outside
/// CDATA sections, comments and processing instructions.
fn repair_xml(text: &str) -> String {
    let declared = dtd_entities(text);
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(pos) = rest.find(['&', '<']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        if rest.starts_with('<') {
            let skip_to = if rest.starts_with("<![CDATA[") {
                rest.find("]]>").map(|e| e + 3)
            } else if rest.starts_with("<!--") {
                rest.find("-->").map(|e| e + 3)
            } else if rest.starts_with("<?") {
                rest.find("?>").map(|e| e + 2)
            } else {
                Some(1)
            };
            let n = skip_to.unwrap_or(rest.len());
            out.push_str(&rest[..n]);
            rest = &rest[n..];
            continue;
        }
        // An '&': keep a valid reference, rewrite an HTML entity, escape anything else.
        let after = &rest[1..];
        match reference_len(after) {
            Some((len, name)) => {
                match name {
                    Some(name) if !XML_ENTITIES.contains(&name) => {
                        if let Some((_, value)) = declared.iter().find(|(n, _)| n == name) {
                            // Declared in the document's own DTD (which XML readers here skip).
                            out.push_str(value);
                        } else if let Some(c) = html_entity(name) {
                            out.push_str(&format!("&#{};", c as u32));
                        } else {
                            out.push_str(&rest[..=len]);
                        }
                    }
                    _ => out.push_str(&rest[..=len]),
                }
                rest = &rest[len + 1..];
            }
            None => {
                out.push_str("&amp;");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

const XML_ENTITIES: [&str; 5] = ["amp", "lt", "gt", "quot", "apos"];

/// The general entities with literal values declared in the document's internal DTD subset
/// (`<!DOCTYPE rss [ <!ENTITY id "tag:example.com,"> ]>`). Bounded in number and size.
fn dtd_entities(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Some(doctype) = text.find("<!DOCTYPE") else {
        return found;
    };
    let after = &text[doctype..];
    let (Some(open), Some(gt)) = (after.find('['), after.find('>')) else {
        return found;
    };
    if open > gt {
        return found;
    }
    let subset = &after[open + 1..];
    let subset = &subset[..subset.find("]>").or_else(|| subset.find(']')).unwrap_or(0)];
    let mut rest = subset;
    while let Some(pos) = rest.find("<!ENTITY") {
        rest = rest[pos + "<!ENTITY".len()..].trim_start();
        if rest.starts_with('%') {
            continue; // a parameter entity
        }
        let name_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let name = &rest[..name_end];
        rest = rest[name_end..].trim_start();
        let Some(quote) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            continue; // an external entity
        };
        let Some(end) = rest[1..].find(quote) else {
            break;
        };
        let value = &rest[1..=end];
        if !name.is_empty() && value.len() <= 4096 && !value.contains('&') {
            found.push((name.to_string(), value.to_string()));
        }
        rest = &rest[end + 2..];
        if found.len() >= 256 {
            break;
        }
    }
    found
}

/// If `s` (what follows an `&`) is a well-formed reference, its length through the `;` and,
/// for a named one, the name.
fn reference_len(s: &str) -> Option<(usize, Option<&str>)> {
    // References are short; looking further would make a run of bare '&' quadratic.
    let end = s.bytes().take(64).position(|b| b == b';')?;
    let body = &s[..end];
    if let Some(num) = body.strip_prefix('#') {
        let ok = if let Some(hex) = num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
            !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
        } else {
            !num.is_empty() && num.chars().all(|c| c.is_ascii_digit())
        };
        return ok.then_some((end + 1, None));
    }
    let mut chars = body.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':');
    let rest_ok = chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'));
    (first_ok && rest_ok).then_some((end + 1, Some(body)))
}

fn html_entity(name: &str) -> Option<char> {
    HTML_ENTITIES
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .and_then(|i| char::from_u32(HTML_ENTITIES[i].1))
}

// ---------------------------------------------------------------------------------------------
// Source scan: a small element tree of the document

const NS_ATOM10: &str = "http://www.w3.org/2005/Atom";
const NS_ATOM03: &str = "http://purl.org/atom/ns#";
const NS_RSS10: &str = "http://purl.org/rss/1.0/";
const NS_RSS090: &str = "http://my.netscape.com/rdf/simple/0.9/";
const NS_RSS_USERLAND: &str = "http://backend.userland.com/rss2";
const NS_RSS_HARVARD: &str = "http://blogs.law.harvard.edu/tech/rss";
const NS_DC: &str = "http://purl.org/dc/elements/1.1/";
const NS_DCTERMS: &str = "http://purl.org/dc/terms/";
const NS_CONTENT: &str = "http://purl.org/rss/1.0/modules/content/";
const NS_ITUNES: &str = "http://www.itunes.com/dtds/podcast-1.0.dtd";
const NS_XHTML: &str = "http://www.w3.org/1999/xhtml";
const NS_MEDIA: &str = "http://search.yahoo.com/mrss/";

/// Elements deeper than this are not kept (a hostile document must not exhaust the stack).
const MAX_DEPTH: usize = 256;

#[derive(Debug, Default)]
struct Node {
    prefix: String,
    /// Lowercase local name.
    local: String,
    ns: String,
    attrs: Vec<(String, String)>,
    /// The effective base URL (xml:base resolved against its ancestors and the document URL).
    base: String,
    children: Vec<Child>,
}

#[derive(Debug)]
enum Child {
    Elem(Node),
    Text(String),
}

impl Node {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// An element of the feed formats themselves (unprefixed, or in an RSS/Atom namespace).
    fn is_core(&self) -> bool {
        self.prefix.is_empty()
            || [
                NS_ATOM10,
                NS_ATOM03,
                NS_RSS10,
                NS_RSS090,
                NS_RSS_USERLAND,
                NS_RSS_HARVARD,
            ]
            .iter()
            .any(|ns| self.in_ns(ns))
    }

    fn is(&self, local: &str) -> bool {
        self.local == local && self.is_core()
    }

    /// In this namespace (compared without case, as feed readers do).
    fn in_ns(&self, ns: &str) -> bool {
        self.ns.eq_ignore_ascii_case(ns)
    }

    fn elements(&self) -> impl Iterator<Item = &Node> {
        self.children.iter().filter_map(|c| match c {
            Child::Elem(n) => Some(n),
            Child::Text(_) => None,
        })
    }

    /// All text below this element, in document order.
    fn text(&self) -> String {
        let mut out = String::new();
        self.collect_text(&mut out);
        out
    }

    fn collect_text(&self, out: &mut String) {
        for child in &self.children {
            match child {
                Child::Text(t) => out.push_str(t),
                Child::Elem(n) => n.collect_text(out),
            }
        }
    }

    /// The children serialised back to markup (for inline XHTML / XML content).
    fn inner_markup(&self) -> String {
        let mut out = String::new();
        for child in &self.children {
            match child {
                Child::Text(t) => out.push_str(&escape_text(t)),
                Child::Elem(n) => n.outer_markup(&mut out),
            }
        }
        out
    }

    fn outer_markup(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.local);
        for (k, v) in &self.attrs {
            if k.starts_with("xmlns") {
                continue;
            }
            out.push_str(&format!(" {k}=\"{}\"", escape_text(v).replace('"', "&quot;")));
        }
        out.push('>');
        out.push_str(&self.inner_markup());
        out.push_str(&format!("</{}>", self.local));
    }
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[derive(Debug)]
enum ScanError {
    NotAFeed(String),
    Malformed(String),
}

/// Reads the document into an element tree, leniently: on an XML error the elements read so
/// far are kept (closed where they stand).
fn build_tree(text: &str, base_url: &str) -> Result<Node, ScanError> {
    use quick_xml::events::Event;

    let mut reader = quick_xml::Reader::from_str(text);
    {
        let config = reader.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = false;
        config.allow_unmatched_ends = true;
        config.allow_dangling_amp = true;
        config.trim_text(false);
    }

    struct Frame {
        node: Node,
        ns_decls: Vec<(String, String)>,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut skipped_depth = 0usize; // open elements below MAX_DEPTH that are not kept
    let mut error = None;

    fn close(stack: &mut Vec<Frame>, root: &mut Option<Node>) {
        if let Some(frame) = stack.pop() {
            match stack.last_mut() {
                Some(parent) => parent.node.children.push(Child::Elem(frame.node)),
                None => {
                    if root.is_none() {
                        *root = Some(frame.node);
                    }
                }
            }
        }
    }
    fn push_text(stack: &mut [Frame], text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(frame) = stack.last_mut() {
            if let Some(Child::Text(last)) = frame.node.children.last_mut() {
                last.push_str(text);
            } else {
                frame.node.children.push(Child::Text(text.to_string()));
            }
        }
    }

    loop {
        let event = match reader.read_event() {
            Ok(e) => e,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        };
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    // Content after the root element: ignore.
                    continue;
                }
                if skipped_depth > 0 || stack.len() >= MAX_DEPTH {
                    skipped_depth += 1;
                    continue;
                }
                let qname = start.name();
                let qname = qname.as_ref();
                let (prefix, local) = match qname.split_once(':') {
                    Some((p, l)) => (p.to_string(), l.to_string()),
                    None => (String::new(), qname.to_string()),
                };
                let mut attrs = Vec::new();
                let mut ns_decls = Vec::new();
                for attr in start.attributes().with_checks(false).flatten() {
                    let key = attr.key.as_ref().to_string();
                    let value = attr
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map(|v| v.into_owned())
                        .unwrap_or_else(|_| attr.value.to_string());
                    if key == "xmlns" {
                        ns_decls.push((String::new(), value.clone()));
                    } else if let Some(p) = key.strip_prefix("xmlns:") {
                        ns_decls.push((p.to_string(), value.clone()));
                    }
                    attrs.push((key, value));
                }
                let ns = ns_decls
                    .iter()
                    .rev()
                    .chain(stack.iter().rev().flat_map(|f| f.ns_decls.iter().rev()))
                    .find(|(p, _)| *p == prefix)
                    .map(|(_, uri)| uri.trim().to_string())
                    .unwrap_or_default();
                let parent_base = stack
                    .last()
                    .map_or(base_url, |f| f.node.base.as_str())
                    .to_string();
                // xml:base; CDF says BASE on its <CHANNEL>.
                let is_cdf_channel = prefix.is_empty() && local == "CHANNEL";
                let base = match attrs
                    .iter()
                    .find(|(k, _)| k == "xml:base" || (is_cdf_channel && k == "BASE"))
                {
                    Some((_, b)) => resolve_url(&parent_base, b),
                    None => parent_base,
                };
                stack.push(Frame {
                    node: Node {
                        prefix,
                        local: local.to_ascii_lowercase(),
                        ns,
                        attrs,
                        base,
                        children: Vec::new(),
                    },
                    ns_decls,
                });
            }
            Event::End(_) => {
                if skipped_depth > 0 {
                    skipped_depth -= 1;
                } else {
                    close(&mut stack, &mut root);
                }
            }
            Event::Text(t) => {
                if skipped_depth == 0 {
                    push_text(&mut stack, &t.xml10_content());
                }
            }
            Event::CData(t) => {
                if skipped_depth == 0 {
                    push_text(&mut stack, &t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if skipped_depth == 0 {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => {
                            let name: &str = &r;
                            match quick_xml::escape::resolve_predefined_entity(name) {
                                Some(s) => s.to_string(),
                                None => match html_entity(name) {
                                    Some(c) => c.to_string(),
                                    None => format!("&{name};"),
                                },
                            }
                        }
                    };
                    push_text(&mut stack, &resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    while !stack.is_empty() {
        close(&mut stack, &mut root);
    }
    match (root, error) {
        (Some(root), _) => Ok(root),
        (None, Some(e)) => Err(ScanError::Malformed(e)),
        (None, None) => Err(ScanError::NotAFeed("no XML element found".into())),
    }
}

/// What the scan reads from the document.
#[derive(Debug, Default)]
struct RawFeed {
    title: Option<String>,
    ttl_minutes: Option<u64>,
    entries: Vec<FeedEntry>,
}

fn scan_document(text: &str, base_url: &str) -> Result<RawFeed, ScanError> {
    let root = build_tree(text, base_url)?;
    if !["rss", "feed", "rdf", "channel", "entry", "item"].contains(&root.local.as_str()) {
        return Err(ScanError::NotAFeed(format!(
            "the document's root element is <{}>",
            root.local
        )));
    }
    // The feed-level element: RSS and RSS 1.0 have a <channel>; Atom's is the root.
    let channel = if root.local == "feed" {
        Some(&root)
    } else {
        root.elements()
            .find(|n| n.is("channel"))
            .or(if root.local == "channel" {
                Some(&root)
            } else {
                None
            })
    };
    let mut raw = RawFeed::default();
    if let Some(channel) = channel {
        raw.title = channel
            .elements()
            .filter(|n| n.is("title"))
            .last()
            .and_then(text_construct_plain);
        raw.ttl_minutes = channel
            .elements()
            .find(|n| n.is("ttl"))
            .and_then(|n| n.text().trim().parse().ok());
    }
    let mut entry_nodes = Vec::new();
    collect_entries(&root, &mut entry_nodes);
    raw.entries = entry_nodes.into_iter().map(scan_entry).collect();
    Ok(raw)
}

fn collect_entries<'a>(node: &'a Node, out: &mut Vec<&'a Node>) {
    if node.is("item") || node.is("entry") {
        out.push(node);
        return;
    }
    for child in node.elements() {
        collect_entries(child, out);
    }
}

fn scan_entry(node: &Node) -> FeedEntry {
    let mut entry = FeedEntry::default();
    // The link rules of the common feed readers: an alternate HTML link or an RSS <link> sets
    // the link; a permalink guid (or an Atom id) fills it only when nothing else did.
    let mut guid_link: Option<String> = None;
    let mut link: Option<String> = None;
    let mut summary: Option<String> = None;
    let mut content: Option<String> = None;
    let (mut dc_title, mut media_title) = (None, None);

    for child in node.elements() {
        let core = child.is_core();
        let name = child.local.as_str();
        match name {
            "id" | "guid" if core => {
                let value = child.text().trim().to_string();
                let permalink = child
                    .attr("isPermaLink")
                    .is_none_or(|v| v.trim().eq_ignore_ascii_case("true"));
                if permalink && link.is_none() && guid_link.is_none() && !value.is_empty() {
                    guid_link = safe_link(&child.base, &value);
                }
                entry.id = Some(value);
            }
            // The first title counts (a second one is a feed error).
            "title" if core && entry.title.is_none() => entry.title = text_construct_plain(child),
            "title" if child.in_ns(NS_DC) && dc_title.is_none() => {
                dc_title = text_construct_plain(child)
            }
            "title" if child.in_ns(NS_MEDIA) && media_title.is_none() => {
                media_title = text_construct_plain(child)
            }
            "link" if core => {
                if let Some(href) = child.attr("href") {
                    let rel = child.attr("rel").map_or("alternate", str::trim);
                    let ty = child
                        .attr("type")
                        .map(|t| t.trim().to_ascii_lowercase())
                        .unwrap_or_else(|| "text/html".into());
                    if rel.eq_ignore_ascii_case("alternate")
                        && matches!(
                            ty.as_str(),
                            "text/html" | "application/xhtml+xml" | "html" | "xhtml"
                        )
                    {
                        link = Some(safe_link(&child.base, href).unwrap_or_default());
                    }
                } else {
                    let value = child.text();
                    let value = value.trim();
                    link = Some(if value.is_empty() {
                        String::new()
                    } else {
                        safe_link(&child.base, value).unwrap_or_default()
                    });
                }
            }
            // Atom person constructs: the last <author> names the entry, as in feedparser.
            "author" if core && child.elements().next().is_some() => {
                let name = child
                    .elements()
                    .find(|n| n.is("name"))
                    .map(|n| collapse_ws(&n.text()))
                    .filter(|n| !n.is_empty());
                if name.is_some() {
                    entry.author = name;
                }
            }
            // Text authors (RSS author, dc:creator …): the first counts.
            _ if entry.author.is_some() => {}
            "author" if core => entry.author = author_name(&child.text()),
            "creator" | "author" if child.in_ns(NS_DC) => entry.author = author_name(&child.text()),
            "author" if child.in_ns(NS_ITUNES) => entry.author = author_name(&child.text()),
            _ => {}
        }
        match name {
            "published" | "issued" | "pubdate" if core => {
                entry.published = parse_date(&child.text()).map(format_rfc3339)
            }
            "issued" if child.in_ns(NS_DCTERMS) => {
                entry.published = parse_date(&child.text()).map(format_rfc3339)
            }
            "updated" | "modified" if core => {
                entry.updated = parse_date(&child.text()).map(format_rfc3339)
            }
            "date" if child.in_ns(NS_DC) => {
                entry.updated = parse_date(&child.text()).map(format_rfc3339)
            }
            "modified" if child.in_ns(NS_DCTERMS) => {
                entry.updated = parse_date(&child.text()).map(format_rfc3339)
            }
            "summary" | "description" if core => summary = text_construct_raw(child),
            "content" if core => content = text_construct_raw(child),
            "encoded" if child.in_ns(NS_CONTENT) => content = text_construct_raw(child),
            "category" if core => {
                let term = child
                    .attr("term")
                    .map(str::to_string)
                    .unwrap_or_else(|| child.text());
                let term = collapse_ws(&term);
                if !term.is_empty() {
                    entry.categories.push(term);
                }
            }
            "subject" if child.in_ns(NS_DC) => {
                let term = collapse_ws(&child.text());
                if !term.is_empty() {
                    entry.categories.push(term);
                }
            }
            _ => {}
        }
    }
    if entry.title.is_none() {
        entry.title = dc_title.or(media_title);
    }
    // RSS 1.0 items name themselves with rdf:about.
    if entry.id.is_none() && node.local == "item" {
        if let Some(about) = node.attr("rdf:about") {
            entry.id = Some(about.trim().to_string());
        }
    }
    // CDF (Microsoft's Channel Definition Format): <ITEM HREF=… LASTMOD=…>.
    if link.is_none() && guid_link.is_none() {
        if let Some(href) = node.attr("href") {
            guid_link = safe_link(&node.base, href);
        }
    }
    if entry.updated.is_none() {
        if let Some(lastmod) = node.attr("lastmod") {
            entry.updated = parse_date(lastmod).map(format_rfc3339);
        }
    }
    entry.id = entry.id.filter(|s| !s.is_empty());
    entry.link = link.or(guid_link).filter(|s| !s.is_empty());
    entry.summary = summary.or(content).filter(|s| !s.trim().is_empty());
    entry
}

/// A text construct as plain text (titles).
fn text_construct_plain(node: &Node) -> Option<String> {
    let (value, is_html) = text_construct(node);
    let plain = if is_html {
        html_to_text(&value)
    } else {
        value
    };
    Some(collapse_ws(&plain)).filter(|s| !s.is_empty())
}

/// A text construct as the feed gives it (summaries: HTML kept).
fn text_construct_raw(node: &Node) -> Option<String> {
    let (value, _) = text_construct(node);
    Some(value.trim().to_string()).filter(|s| !s.is_empty())
}

/// The value of a text construct and whether it is HTML.
fn text_construct(node: &Node) -> (String, bool) {
    let ty = node
        .attr("type")
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let mode = node
        .attr("mode")
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_atom10 = node.in_ns(NS_ATOM10);
    let is_atom = is_atom10 || node.in_ns(NS_ATOM03);
    let xhtml = matches!(ty.as_str(), "xhtml" | "application/xhtml+xml")
        || mode == "xml"
        || node.elements().any(|n| n.in_ns(NS_XHTML));
    if xhtml {
        // Inline XHTML: the markup is real elements (text, CDATA included, is text); unwrap
        // the conventional <div>.
        let only_div = {
            let mut elems = node.elements();
            let has_text = node
                .children
                .iter()
                .any(|c| matches!(c, Child::Text(t) if !t.trim().is_empty()));
            match (elems.next(), elems.next()) {
                (Some(div), None) if div.local == "div" && !has_text => Some(div),
                _ => None,
            }
        };
        let markup = only_div.map_or_else(|| node.inner_markup(), Node::inner_markup);
        return (markup, true);
    }
    let mut value = node.text();
    // Atom 0.3 says so with mode="base64"; Atom 1.0 with any media type that is not text or
    // XML.
    let base64 = mode == "base64"
        || (is_atom10
            && ty.contains('/')
            && !ty.starts_with("text/")
            && !ty.ends_with("+xml")
            && !ty.ends_with("/xml"));
    if base64 {
        if let Some(decoded) = base64_decode(&value) {
            value = String::from_utf8_lossy(&decoded).into_owned();
        }
    }
    let is_html = match ty.as_str() {
        "html" | "text/html" => true,
        "text" | "text/plain" | "" => !is_atom && looks_like_html(&value),
        _ => false,
    };
    (value, is_html)
}

/// The guess feed readers make for RSS text that declares no type: a closing tag or a known
/// entity reference means HTML.
fn looks_like_html(s: &str) -> bool {
    let has_close_tag = s.match_indices("</").any(|(i, _)| {
        let rest = &s[i + 2..];
        let name_len = rest
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        name_len > 0 && rest[name_len..].starts_with('>')
    });
    let mut has_entity = false;
    for (i, _) in s.match_indices('&') {
        if let Some((len, name)) = reference_len(&s[i + 1..]) {
            if let Some(name) = name {
                if !XML_ENTITIES.contains(&name) && html_entity(name).is_none() {
                    return false;
                }
            }
            let _ = len;
            has_entity = true;
        }
    }
    has_close_tag || has_entity
}

/// The name in an RSS author / dc:creator value such as `jo@example.com (Jo Smith)`.
fn author_name(raw: &str) -> Option<String> {
    let raw = collapse_ws(raw);
    let mut name = raw.clone();
    if let Some(email) = find_email(&raw) {
        name = name.replace(&email, "");
        name = name.replace("()", "").replace("<>", "").replace("&lt;&gt;", "");
        let mut n = name.trim();
        n = n.strip_prefix('(').unwrap_or(n);
        n = n.strip_suffix(')').unwrap_or(n);
        name = n.trim().to_string();
    }
    Some(name).filter(|n| !n.is_empty())
}

/// The first e-mail address in a string (with an optional `mailto:`/`?subject=`).
fn find_email(s: &str) -> Option<String> {
    let at = s.find('@')?;
    let is_local = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+');
    let is_domain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']');
    let start = s[..at]
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_local(*c))
        .last()
        .map(|(i, _)| i)?;
    let mut end = at
        + 1
        + s[at + 1..]
            .char_indices()
            .find(|(_, c)| !is_domain(*c))
            .map_or(s.len() - at - 1, |(i, _)| i);
    let domain = &s[at + 1..end];
    if !domain.contains('.') {
        return None;
    }
    if s[end..].starts_with("?subject=") {
        end += s[end..].find(char::is_whitespace).unwrap_or(s.len() - end);
    }
    let mut start = start;
    if s[..start].ends_with("mailto:") {
        start -= "mailto:".len();
    }
    Some(s[start..end].to_string())
}

/// Merges the scan with feed-rs's reading. The scan decides the entries and their identity
/// fields; feed-rs supplies the summary and categories when it read the same entries.
fn merge(raw: RawFeed, feed: Option<&feed_rs::model::Feed>) -> ParsedFeed {
    let fr_entries = feed
        .map(|f| f.entries.as_slice())
        .filter(|e| e.len() == raw.entries.len());
    let entries = raw
        .entries
        .into_iter()
        .enumerate()
        .map(|(i, mut entry)| {
            if let Some(fr) = fr_entries.and_then(|es| es.get(i)) {
                if let Some(summary) = feed_rs_summary(fr) {
                    entry.summary = Some(summary);
                }
                if entry.categories.is_empty() {
                    entry.categories = fr.categories.iter().map(|c| c.term.clone()).collect();
                }
                if entry.title.is_none() {
                    entry.title = fr.title.as_ref().and_then(feed_rs_text_plain);
                }
            }
            entry.key = entry_key(&entry);
            entry
        })
        .collect();
    ParsedFeed {
        title: raw
            .title
            .or_else(|| feed.and_then(|f| f.title.as_ref().and_then(feed_rs_text_plain))),
        ttl: raw
            .ttl_minutes
            .or_else(|| feed.and_then(|f| f.ttl.map(u64::from)))
            .map(|m| Duration::from_secs(m.saturating_mul(60))),
        entries,
    }
}

// ---------------------------------------------------------------------------------------------
// Text helpers

fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Resolves a (possibly relative) reference against a base the way feed readers do (RFC 3986
/// resolution as Python's `urljoin` performs it): no re-encoding or normalisation beyond
/// dot segments, a lowercase scheme, and empty `?`/`#` dropped. A reference with a scheme
/// other than the base's is kept as written.
fn resolve_url(base: &str, href: &str) -> String {
    let href: String = href
        .trim()
        .chars()
        .filter(|c| !matches!(c, '\t' | '\r' | '\n'))
        .collect();
    let href = collapse_scheme_slashes(&href);
    let base = base.trim();
    if base.is_empty() {
        return href;
    }
    if href.is_empty() {
        return base.to_string();
    }
    let b = split_url(base);
    let r = split_url(&href);
    let scheme = r.scheme.clone().unwrap_or_else(|| b.scheme.clone().unwrap_or_default());
    if Some(&scheme) != b.scheme.as_ref() && !(r.scheme.is_none() && b.scheme.is_none()) {
        return href;
    }
    const USES_RELATIVE: [&str; 18] = [
        "", "ftp", "http", "gopher", "nntp", "imap", "wais", "file", "https", "shttp", "mms",
        "prospero", "rtsp", "rtspu", "sftp", "svn", "svn+ssh", "ws",
    ];
    if !USES_RELATIVE.contains(&scheme.as_str()) && scheme != "wss" {
        return href;
    }
    if r.netloc.is_some() {
        return unsplit_url(&scheme, r.netloc.as_deref(), &r.path, &r.query, &r.fragment);
    }
    let netloc = b.netloc.as_deref();
    if r.path.is_empty() {
        let query = if r.query.is_empty() { &b.query } else { &r.query };
        return unsplit_url(&scheme, netloc, &b.path, query, &r.fragment);
    }
    let mut base_parts: Vec<&str> = b.path.split('/').collect();
    if base_parts.last().is_some_and(|p| !p.is_empty()) {
        base_parts.pop();
    }
    let segments: Vec<&str> = if r.path.starts_with('/') {
        r.path.split('/').collect()
    } else {
        let mut all: Vec<&str> = base_parts;
        all.extend(r.path.split('/'));
        // Empty segments in the middle are dropped (as urljoin does).
        let n = all.len();
        all.into_iter()
            .enumerate()
            .filter(|(i, seg)| *i == 0 || *i == n - 1 || !seg.is_empty())
            .map(|(_, seg)| seg)
            .collect()
    };
    let mut resolved: Vec<&str> = Vec::new();
    for seg in &segments {
        match *seg {
            ".." => {
                resolved.pop();
            }
            "." => {}
            other => resolved.push(other),
        }
    }
    if segments.last().is_some_and(|s| *s == "." || *s == "..") {
        resolved.push("");
    }
    let mut path = resolved.join("/");
    if path.is_empty() {
        path = "/".into();
    }
    unsplit_url(&scheme, netloc, &path, &r.query, &r.fragment)
}

/// `http:////host` → `http://host` (a common feed typo).
fn collapse_scheme_slashes(href: &str) -> String {
    if let Some(i) = href.find("://") {
        if has_scheme(&href[..=i]) {
            let rest = href[i + 3..].trim_start_matches('/');
            return format!("{}{rest}", &href[..i + 3]);
        }
    }
    href.to_string()
}

struct UrlParts {
    scheme: Option<String>,
    netloc: Option<String>,
    path: String,
    query: String,
    fragment: String,
}

fn split_url(url: &str) -> UrlParts {
    let (scheme, mut rest) = match url.find(':') {
        Some(i) if has_scheme(&url[..=i]) => (Some(url[..i].to_ascii_lowercase()), &url[i + 1..]),
        _ => (None, url),
    };
    let mut fragment = String::new();
    if let Some(i) = rest.find('#') {
        fragment = rest[i + 1..].to_string();
        rest = &rest[..i];
    }
    let mut query = String::new();
    if let Some(i) = rest.find('?') {
        query = rest[i + 1..].to_string();
        rest = &rest[..i];
    }
    let mut netloc = None;
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find('/').unwrap_or(after.len());
        netloc = Some(after[..end].to_string());
        rest = &after[end..];
    }
    UrlParts {
        scheme,
        netloc,
        path: rest.to_string(),
        query,
        fragment,
    }
}

fn unsplit_url(scheme: &str, netloc: Option<&str>, path: &str, query: &str, fragment: &str) -> String {
    let mut url = String::new();
    if !scheme.is_empty() {
        url.push_str(scheme);
        url.push(':');
    }
    if let Some(netloc) = netloc.filter(|n| !n.is_empty()) {
        url.push_str("//");
        url.push_str(netloc);
        if !path.is_empty() && !path.starts_with('/') {
            url.push('/');
        }
    }
    url.push_str(path);
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    if !fragment.is_empty() {
        url.push('#');
        url.push_str(fragment);
    }
    url
}

/// A resolved entry link, or None when its scheme is not one a reader should follow
/// (`javascript:`, `data:`, or an id scheme such as `urn:`/`tag:` used as a guid).
fn safe_link(base: &str, href: &str) -> Option<String> {
    let url = resolve_url(base, href);
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase())?;
    const ACCEPTABLE: [&str; 44] = [
        "file", "ftp", "gopher", "h323", "hdl", "http", "https", "imap", "magnet", "mailto",
        "mms", "news", "nntp", "prospero", "rsync", "rtsp", "rtspu", "sftp", "shttp", "sip",
        "sips", "snews", "svn", "svn+ssh", "telnet", "wais", "aim", "callto", "cvs", "facetime",
        "feed", "git", "gtalk", "irc", "ircs", "irc6", "itms", "msnim", "skype", "ssh", "smb",
        "ymsg", "ws", "wss",
    ];
    (has_scheme(&format!("{scheme}:")) && ACCEPTABLE.contains(&scheme.as_str())).then_some(url)
}

fn has_scheme(s: &str) -> bool {
    match s.find(':') {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// HTML to plain text: tags dropped (and the content of script/style), entities decoded.
fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(pos) = rest.find(['<', '&']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        if rest.starts_with('&') {
            match reference_len(&rest[1..]) {
                Some((len, name)) => {
                    let body = &rest[1..len];
                    let decoded = match name {
                        Some(n) => quick_xml::escape::resolve_predefined_entity(n)
                            .and_then(|s| s.chars().next())
                            .or_else(|| html_entity(n)),
                        None => decode_char_ref(body),
                    };
                    match decoded {
                        Some(c) => out.push(c),
                        None => out.push_str(&rest[..=len]),
                    }
                    rest = &rest[len + 1..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
            continue;
        }
        // '<': a tag, comment or declaration — or a lone '<'.
        let next = rest[1..].chars().next();
        let is_markup = next.is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '/' | '!' | '?'));
        if !is_markup {
            out.push('<');
            rest = &rest[1..];
            continue;
        }
        if rest.starts_with("<!--") {
            rest = rest.find("-->").map_or("", |e| &rest[e + 3..]);
            continue;
        }
        let Some(end) = tag_end(rest) else {
            // An unterminated '<' is text.
            out.push('<');
            rest = &rest[1..];
            continue;
        };
        let tag = rest[1..end].trim_start_matches('/').to_ascii_lowercase();
        rest = &rest[end..];
        for skip in ["script", "style"] {
            if tag.starts_with(skip) && !tag.ends_with('/') && !rest.is_empty() {
                let close = format!("</{skip}");
                let lower = rest.to_ascii_lowercase();
                rest = lower.find(&close).map_or("", |e| {
                    let after = &rest[e..];
                    after.find('>').map_or("", |g| &after[g + 1..])
                });
            }
        }
        // Block-level tags separate words.
        out.push(' ');
    }
    out.push_str(rest);
    out
}

fn decode_char_ref(body: &str) -> Option<char> {
    let num = body.strip_prefix('#')?;
    let n = if let Some(hex) = num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
        u32::from_str_radix(hex, 16).ok()?
    } else {
        num.parse().ok()?
    };
    char::from_u32(n)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            c if c.is_ascii_whitespace() => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Dates

/// Parses the date formats found in feeds to unix seconds (UTC): W3C-DTF / RFC 3339 / ISO 8601
/// (with the partial forms `YYYY`, `YYYY-MM`, `YYYY-MM-DD`), RFC 822/2822 with the usual
/// deviations, and asctime. Out-of-range fields roll over, as feed readers do.
fn parse_date(text: &str) -> Option<i64> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    parse_w3dtf(s)
        .or_else(|| parse_rfc822(s))
        .or_else(|| parse_asctime(s))
}

/// `YYYY-MM-DDTHH:MM:SS.sss±HH:MM` and its looser and partial forms.
fn parse_w3dtf(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| -> Option<i64> {
        let part = b.get(from..from + n)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    let year = digits(0, 4)?;
    let mut i = 4;
    let (mut month, mut day) = (1, 1);
    if b.get(i) == Some(&b'-') {
        month = digits(i + 1, 2)?;
        i += 3;
        if b.get(i) == Some(&b'-') {
            day = digits(i + 1, 2)?;
            i += 3;
        }
    } else if let (Some(m), Some(d)) = (digits(4, 2), digits(6, 2)) {
        month = m;
        day = d;
        i = 8;
    }
    if b.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let date_secs = civil_to_days(year, month, day)? * 86_400;
    // Separator: 'T' and/or spaces.
    let mut j = i;
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    if matches!(b.get(j), Some(b'T') | Some(b't')) {
        j += 1;
    }
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    if j == b.len() {
        return (i == j || s[i..].trim().is_empty()).then_some(date_secs);
    }
    if j == i {
        return None;
    }
    // Time.
    let (Some(hour), Some(b':')) = (digits(j, 2), b.get(j + 2)) else {
        // A time we cannot read: the day itself, at midnight UTC.
        return Some(date_secs);
    };
    let minute = digits(j + 3, 2)?;
    let mut k = j + 5;
    let mut second = 0;
    if b.get(k) == Some(&b':') {
        second = digits(k + 1, 2)?;
        k += 3;
        if matches!(b.get(k), Some(b'.') | Some(b',')) {
            k += 1;
            while b.get(k).is_some_and(u8::is_ascii_digit) {
                k += 1;
            }
        }
    }
    while b.get(k) == Some(&b' ') {
        k += 1;
    }
    let offset = match b.get(k) {
        None => 0,
        Some(b'Z') | Some(b'z') if k + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let rest = &s[k + 1..];
            let (h, m) = match rest.len() {
                2 => (rest.parse::<i64>().ok()?, 0),
                4 => (rest[..2].parse::<i64>().ok()?, rest[2..].parse::<i64>().ok()?),
                5 if rest.as_bytes()[2] == b':' => {
                    (rest[..2].parse::<i64>().ok()?, rest[3..].parse::<i64>().ok()?)
                }
                _ => return None,
            };
            let off = h * 3600 + m * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    Some(date_secs + hour * 3600 + minute * 60 + second - offset)
}

/// RFC 822 as feeds write it: `[Day,] DD Mon YY[YY] HH:MM[:SS] [zone]` (day and month may be
/// swapped; a missing time is midnight; an unknown zone is UTC).
fn parse_rfc822(s: &str) -> Option<i64> {
    let lower = s.to_ascii_lowercase();
    let mut parts: Vec<&str> = lower.split_whitespace().collect();
    if parts.len() < 5 {
        parts.extend(["00:00:00", "0000"]);
    }
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    if parts
        .first()
        .is_some_and(|p| DAYS.contains(&p.get(..3).unwrap_or(p)))
    {
        parts.remove(0);
    }
    if parts.len() < 5 {
        return None;
    }
    let month_of = |p: &str| month_number(p.get(..3).unwrap_or(p));
    let (day, month) = match parts[0].parse::<i64>() {
        Ok(d) => (d, month_of(parts[1])?),
        Err(_) => (parts[1].parse::<i64>().ok()?, month_of(parts[0])?),
    };
    let mut year: i64 = parts[2].parse().ok()?;
    if parts[2].len() <= 2 {
        year += if year < 90 { 2000 } else { 1900 };
    }
    let mut time = parts[3].split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next().unwrap_or("0").parse().ok()?;
    let second: i64 = time.next().unwrap_or("0").parse().ok()?;
    if !(0..24).contains(&hour) || !(0..60).contains(&minute) || !(0..62).contains(&second) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let offset = zone_offset(parts[4])?;
    Some(civil_to_days(year, month, day)? * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// `Sun Jan  4 16:29:06 [PST] 2004`.
fn parse_asctime(s: &str) -> Option<i64> {
    let lower = s.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split_whitespace().collect();
    let (zone, year) = match parts.len() {
        5 => ("utc", parts[4]),
        6 => (parts[4], parts[5]),
        _ => return None,
    };
    let month = month_number(parts[1].get(..3)?)?;
    let day: i64 = parts[2].parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let mut time = parts[3].split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next().unwrap_or("0").parse().ok()?;
    if day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 61 {
        return None;
    }
    let offset = zone_offset(zone)?;
    Some(civil_to_days(year, month, day)? * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Seconds east of UTC for an RFC 822 zone (`+0500`, `-05:00`, `GMT+1`, `EST` …); unknown
/// names count as UTC.
fn zone_offset(zone: &str) -> Option<i64> {
    let mut zone = zone.strip_prefix("etc/").unwrap_or(zone).to_string();
    if let Some(rest) = zone.strip_prefix("gmt") {
        let rest = rest.replace(':', "");
        zone = if rest.is_empty() { "gmt".into() } else { rest };
    }
    let b = zone.as_bytes();
    if let Some(&sign @ (b'+' | b'-')) = b.first() {
        let (h, m) = if zone.contains(':') {
            (zone.get(1..3)?.parse::<i64>().ok()?, zone.get(4..)?.parse::<i64>().unwrap_or(0))
        } else {
            (
                zone.get(1..3)?.parse::<i64>().ok()?,
                zone.get(3..).filter(|m| !m.is_empty()).map_or(Some(0), |m| m.parse::<i64>().ok())?,
            )
        };
        let off = h * 3600 + m * 60;
        return Some(if sign == b'-' { -off } else { off });
    }
    let hours = match zone.as_str() {
        "adt" => -3,
        "ast" | "at" | "edt" => -4,
        "est" | "et" | "cdt" => -5,
        "cst" | "ct" | "mdt" => -6,
        "mst" | "mt" | "pdt" => -7,
        "pst" | "pt" => -8,
        _ => 0,
    };
    Some(hours * 3600)
}

fn month_number(abbrev: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    MONTHS
        .iter()
        .position(|m| *m == abbrev)
        .and_then(|i| i64::try_from(i + 1).ok())
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a civil date; month and day may be out of range and roll over.
fn civil_to_days(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(0..=9999).contains(&year) || !(0..=99).contains(&month) || !(0..=99).contains(&day) {
        return None;
    }
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468 + (day - 1))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The HTML 4 named entities (name, code point), sorted by name for binary search.
const HTML_ENTITIES: &[(&str, u32)] = &[
    ("AElig", 198), ("Aacute", 193), ("Acirc", 194), ("Agrave", 192), ("Alpha", 913),
    ("Aring", 197), ("Atilde", 195), ("Auml", 196), ("Beta", 914), ("Ccedil", 199), ("Chi", 935),
    ("Dagger", 8225), ("Delta", 916), ("ETH", 208), ("Eacute", 201), ("Ecirc", 202),
    ("Egrave", 200), ("Epsilon", 917), ("Eta", 919), ("Euml", 203), ("Gamma", 915),
    ("Iacute", 205), ("Icirc", 206), ("Igrave", 204), ("Iota", 921), ("Iuml", 207),
    ("Kappa", 922), ("Lambda", 923), ("Mu", 924), ("Ntilde", 209), ("Nu", 925), ("OElig", 338),
    ("Oacute", 211), ("Ocirc", 212), ("Ograve", 210), ("Omega", 937), ("Omicron", 927),
    ("Oslash", 216), ("Otilde", 213), ("Ouml", 214), ("Phi", 934), ("Pi", 928), ("Prime", 8243),
    ("Psi", 936), ("Rho", 929), ("Scaron", 352), ("Sigma", 931), ("THORN", 222), ("Tau", 932),
    ("Theta", 920), ("Uacute", 218), ("Ucirc", 219), ("Ugrave", 217), ("Upsilon", 933),
    ("Uuml", 220), ("Xi", 926), ("Yacute", 221), ("Yuml", 376), ("Zeta", 918), ("aacute", 225),
    ("acirc", 226), ("acute", 180), ("aelig", 230), ("agrave", 224), ("alefsym", 8501),
    ("alpha", 945), ("amp", 38), ("and", 8743), ("ang", 8736), ("aring", 229), ("asymp", 8776),
    ("atilde", 227), ("auml", 228), ("bdquo", 8222), ("beta", 946), ("brvbar", 166),
    ("bull", 8226), ("cap", 8745), ("ccedil", 231), ("cedil", 184), ("cent", 162), ("chi", 967),
    ("circ", 710), ("clubs", 9827), ("cong", 8773), ("copy", 169), ("crarr", 8629),
    ("cup", 8746), ("curren", 164), ("dArr", 8659), ("dagger", 8224), ("darr", 8595),
    ("deg", 176), ("delta", 948), ("diams", 9830), ("divide", 247), ("eacute", 233),
    ("ecirc", 234), ("egrave", 232), ("empty", 8709), ("emsp", 8195), ("ensp", 8194),
    ("epsilon", 949), ("equiv", 8801), ("eta", 951), ("eth", 240), ("euml", 235), ("euro", 8364),
    ("exist", 8707), ("fnof", 402), ("forall", 8704), ("frac12", 189), ("frac14", 188),
    ("frac34", 190), ("frasl", 8260), ("gamma", 947), ("ge", 8805), ("gt", 62), ("hArr", 8660),
    ("harr", 8596), ("hearts", 9829), ("hellip", 8230), ("iacute", 237), ("icirc", 238),
    ("iexcl", 161), ("igrave", 236), ("image", 8465), ("infin", 8734), ("int", 8747),
    ("iota", 953), ("iquest", 191), ("isin", 8712), ("iuml", 239), ("kappa", 954),
    ("lArr", 8656), ("lambda", 955), ("lang", 9001), ("laquo", 171), ("larr", 8592),
    ("lceil", 8968), ("ldquo", 8220), ("le", 8804), ("lfloor", 8970), ("lowast", 8727),
    ("loz", 9674), ("lrm", 8206), ("lsaquo", 8249), ("lsquo", 8216), ("lt", 60), ("macr", 175),
    ("mdash", 8212), ("micro", 181), ("middot", 183), ("minus", 8722), ("mu", 956),
    ("nabla", 8711), ("nbsp", 160), ("ndash", 8211), ("ne", 8800), ("ni", 8715), ("not", 172),
    ("notin", 8713), ("nsub", 8836), ("ntilde", 241), ("nu", 957), ("oacute", 243),
    ("ocirc", 244), ("oelig", 339), ("ograve", 242), ("oline", 8254), ("omega", 969),
    ("omicron", 959), ("oplus", 8853), ("or", 8744), ("ordf", 170), ("ordm", 186),
    ("oslash", 248), ("otilde", 245), ("otimes", 8855), ("ouml", 246), ("para", 182),
    ("part", 8706), ("permil", 8240), ("perp", 8869), ("phi", 966), ("pi", 960), ("piv", 982),
    ("plusmn", 177), ("pound", 163), ("prime", 8242), ("prod", 8719), ("prop", 8733),
    ("psi", 968), ("quot", 34), ("rArr", 8658), ("radic", 8730), ("rang", 9002), ("raquo", 187),
    ("rarr", 8594), ("rceil", 8969), ("rdquo", 8221), ("real", 8476), ("reg", 174),
    ("rfloor", 8971), ("rho", 961), ("rlm", 8207), ("rsaquo", 8250), ("rsquo", 8217),
    ("sbquo", 8218), ("scaron", 353), ("sdot", 8901), ("sect", 167), ("shy", 173),
    ("sigma", 963), ("sigmaf", 962), ("sim", 8764), ("spades", 9824), ("sub", 8834),
    ("sube", 8838), ("sum", 8721), ("sup", 8835), ("sup1", 185), ("sup2", 178), ("sup3", 179),
    ("supe", 8839), ("szlig", 223), ("tau", 964), ("there4", 8756), ("theta", 952),
    ("thetasym", 977), ("thinsp", 8201), ("thorn", 254), ("tilde", 732), ("times", 215),
    ("trade", 8482), ("uArr", 8657), ("uacute", 250), ("uarr", 8593), ("ucirc", 251),
    ("ugrave", 249), ("uml", 168), ("upsih", 978), ("upsilon", 965), ("uuml", 252),
    ("weierp", 8472), ("xi", 958), ("yacute", 253), ("yen", 165), ("yuml", 255), ("zeta", 950),
    ("zwj", 8205), ("zwnj", 8204),
];
