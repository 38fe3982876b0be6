//! Feed parsing: RSS 0.9x/1.0/2.0, Atom 0.3/1.0 and JSON Feed bytes into Tidings entries (pure, no I/O).
//!
//! [`parse_feed`] turns a fetched body into a [`ParsedFeed`]; [`entry_data`] is the `data` of
//! the `entry` message SPEC §4 publishes; [`order_oldest_first`] is the publish order. Parsing
//! is CPU work (about 0.4 s for an 11 MB feed in a release build): call it off the async
//! runtime's worker threads.
//!
//! How a document is read:
//!
//! 1. **Decoding** (`decode`). A byte-order mark (or the UTF-16/32 shape of `<?`) wins, then
//!    the charset of the HTTP `Content-Type`, then the XML declaration's `encoding`, then
//!    UTF-8; a body that is not valid in the declared encoding is read as UTF-8, else as
//!    windows-1252, so a mislabelled feed is still read. UTF-32 is decoded here (encoding_rs
//!    has no UTF-32). The text handed on is UTF-8, its declaration without `encoding`.
//! 2. **Repair** (`decode`). Outside CDATA sections, comments and PIs: a bare `&` (not starting
//!    an entity or character reference) becomes `&amp;` — otherwise one stray `&` in a title
//!    loses the whole feed in feed-rs — entities declared in the document's internal DTD are
//!    expanded, and the HTML entities XML does not know (`&nbsp;`, `&eacute;` …) become
//!    character references.
//! 3. **feed-rs** parses the repaired document, inside `catch_unwind` (it has panicked on odd
//!    input) and with Tidings' date parser. Its gaps are closed first: `<rss>` without a
//!    version (or with 0.90/0.93/0.94) gets `version="2.0"`; the Atom 0.3, RSS 0.90 and
//!    Userland namespaces are mapped to the ones it knows; and its id generator is replaced
//!    by one that generates nothing, so an entry without a guid/id has no id rather than a
//!    random UUID that changes on every parse.
//! 4. **Source scan** (`scan`). The same text is read into a small element tree (with
//!    quick-xml, feed-rs's own XML reader), which tells what the document *says*: whether an
//!    entry has a guid/id at all, the title's declared type, which element a date came from
//!    (feed-rs copies an RSS `pubDate` into `updated`), `xml:base` on every element, Atom 0.3,
//!    RSS 1.0, Dublin Core, iTunes and CDF names, and the link rules of the common feed readers.
//!    It also reads the documents feed-rs rejects outright (an Atom text construct with an
//!    unusual `type`, say — about one document in thirteen of the regression corpus).
//! 5. **Merge.** The scan decides the entries and their id, title, link, author and times;
//!    feed-rs contributes the summary/content and categories when it read the same entries,
//!    and the whole result when the scan cannot read the document. JSON Feed is read by
//!    feed-rs alone.
//!
//! Field rules: titles are plain text (HTML stripped and entities decoded when the title is
//! HTML: Atom `type="html"`/`xhtml`, Atom 0.3 `text/html`, or an untyped RSS title that looks
//! like HTML); the first title counts. The link is the last alternate HTML link or RSS
//! `<link>`, else a permalink guid / Atom id, resolved against `xml:base` and the document URL
//! as Python's `urljoin` does (no re-encoding), and only when its scheme is one a reader can
//! follow — a `urn:`/`tag:` id or a `javascript:` link gives no link. The author is the name
//! (of the last Atom `<author>`, or the first RSS `author`/`dc:creator` with the e-mail
//! address taken out). Times are RFC 3339 UTC to the second; out-of-range fields roll over.
//! The key is the SHA-256 of the id as written, else of the link, else of title + summary.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

mod dates;
mod decode;
mod scan;
mod text;

use self::dates::{format_rfc3339, parse_date};
use self::decode::{
    attr_in_tag, decode, media_type, remove_attr_from_tag, repair_xml, root_start_tag,
};
use self::scan::{
    scan_document, RawFeed, ScanError, NS_ATOM03, NS_ATOM10, NS_RSS090, NS_RSS10, NS_RSS_HARVARD,
    NS_RSS_USERLAND,
};
use self::text::{collapse_ws, html_to_text, safe_link};

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
pub fn order_oldest_first(entries: &mut [FeedEntry]) {
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
        // The scan found the feed but none of its entries (an exotic vocabulary feed-rs knows):
        // feed-rs's reading is the better one.
        (Ok(raw), Ok(feed)) if raw.entries.is_empty() && !feed.entries.is_empty() => {
            Ok(from_feed_rs_model(&feed, base_url))
        }
        (Ok(raw), Ok(feed)) => Ok(merge(raw, Some(&feed))),
        (Ok(raw), Err(_)) => Ok(merge(raw, None)),
        (Err(_), Ok(feed)) => Ok(from_feed_rs_model(&feed, base_url)),
        (Err(scan_err), Err(fr_err)) => Err(match scan_err {
            ScanError::NotAFeed(what) => FeedError::NotAFeed(what),
            ScanError::Malformed(what) => FeedError::Malformed(format!("{what}; {fr_err}")),
        }),
    }
}

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
    if matches!(
        version.as_deref(),
        Some("2.0") | Some("0.91") | Some("0.92")
    ) {
        return text.to_string();
    }
    let mut new_tag = String::with_capacity(tag.len() + 16);
    new_tag.push_str("<rss version=\"2.0\"");
    let rest = remove_attr_from_tag(&tag[name_end..], "version");
    if !rest.starts_with(char::is_whitespace) && !rest.starts_with('>') && !rest.starts_with('/') {
        new_tag.push(' ');
    }
    new_tag.push_str(&rest);
    format!("{}{}{}", &text[..start], new_tag, &text[end..])
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
                .and_then(|l| safe_link(base_url, &l.href));
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
    // SPEC §4: the id, else the link, else title + content, hashed as they are.
    let material = match (&entry.id, &entry.link) {
        (Some(id), _) => id.clone(),
        (None, Some(link)) => link.clone(),
        (None, None) => format!(
            "{}{}",
            entry.title.as_deref().unwrap_or(""),
            entry.summary.as_deref().unwrap_or("")
        ),
    };
    let digest = Sha256::digest(material.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://example.org/feeds/news.xml";

    fn parse(doc: &str) -> ParsedFeed {
        parse_feed(doc.as_bytes(), Some("application/xml"), BASE).unwrap()
    }

    /// Atom in the shape of a Q&A site's "newest questions" feed.
    const QA_ATOM: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:re="http://purl.org/atompub/rank/1.0">
  <title type="text">Newest questions - Stack Overflow</title>
  <link rel="self" href="https://stackoverflow.com/feeds" type="application/atom+xml" />
  <link rel="alternate" href="https://stackoverflow.com/questions" type="text/html" />
  <subtitle>most recent 30 from stackoverflow.com</subtitle>
  <updated>2026-11-22T10:00:05Z</updated>
  <id>https://stackoverflow.com/feeds</id>
  <entry>
    <id>https://stackoverflow.com/q/79000002</id>
    <re:rank scheme="https://stackoverflow.com">0</re:rank>
    <title type="text">How do I keep feed ids stable &amp; unique?</title>
    <category scheme="https://stackoverflow.com/tags" term="rust" />
    <category scheme="https://stackoverflow.com/tags" term="rss" />
    <author>
      <name>Jane Doe</name>
      <uri>https://stackoverflow.com/users/1/jane-doe</uri>
    </author>
    <link rel="alternate" href="https://stackoverflow.com/questions/79000002/how-do-i-keep" />
    <published>2026-11-22T10:00:00Z</published>
    <updated>2026-11-22T10:00:00Z</updated>
    <summary type="html">&lt;p&gt;I am writing a poller&amp;hellip;&lt;/p&gt;</summary>
  </entry>
  <entry>
    <id>https://stackoverflow.com/q/79000001</id>
    <title type="html">&lt;b&gt;Why&lt;/b&gt; does   &amp;lt;T&amp;gt; fail?</title>
    <author><name>  Li
      Wei </name></author>
    <link rel="alternate" href="https://stackoverflow.com/questions/79000001/why" />
    <published>2026-11-22T11:58:30+02:00</published>
    <updated>2026-11-22T10:01:00+00:00</updated>
    <summary type="html">short</summary>
  </entry>
</feed>"#;

    #[test]
    fn atom_newest_questions_feed() {
        let feed = parse(QA_ATOM);
        assert_eq!(
            feed.title.as_deref(),
            Some("Newest questions - Stack Overflow")
        );
        assert_eq!(feed.ttl, None);
        let expected = [
            (
                "https://stackoverflow.com/q/79000002",
                "How do I keep feed ids stable & unique?",
                "https://stackoverflow.com/questions/79000002/how-do-i-keep",
                "Jane Doe",
                "2026-11-22T10:00:00Z",
                "2026-11-22T10:00:00Z",
                "<p>I am writing a poller&hellip;</p>",
                vec!["rust", "rss"],
            ),
            (
                "https://stackoverflow.com/q/79000001",
                "Why does <T> fail?",
                "https://stackoverflow.com/questions/79000001/why",
                "Li Wei",
                "2026-11-22T09:58:30Z",
                "2026-11-22T10:01:00Z",
                "short",
                vec![],
            ),
        ];
        assert_eq!(feed.entries.len(), expected.len());
        for (entry, (id, title, link, author, published, updated, summary, cats)) in
            feed.entries.iter().zip(expected)
        {
            assert_eq!(entry.id.as_deref(), Some(id));
            assert_eq!(entry.title.as_deref(), Some(title));
            assert_eq!(entry.link.as_deref(), Some(link));
            assert_eq!(entry.author.as_deref(), Some(author));
            assert_eq!(entry.published.as_deref(), Some(published));
            assert_eq!(entry.updated.as_deref(), Some(updated));
            assert_eq!(entry.summary.as_deref(), Some(summary));
            assert_eq!(entry.categories, cats);
            assert_eq!(entry.key, sha256_hex(id));
        }
    }

    fn sha256_hex(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn rss_in_iso_8859_1_with_non_ascii_titles() {
        // "Café crème" and "Übergrößen" in ISO-8859-1 bytes.
        let latin1 = |s: &str| -> Vec<u8> { s.chars().map(|c| c as u32 as u8).collect() };
        let body = |decl: &str| {
            latin1(&format!(
                "{decl}<rss version=\"2.0\"><channel><title>Caf\u{e9}</title><ttl>45</ttl>\
                 <item><title>Caf\u{e9} cr\u{e8}me</title><guid>a1</guid>\
                 <pubDate>Sun, 22 Nov 2026 10:00:00 +0100</pubDate></item>\
                 <item><title>\u{dc}bergr\u{f6}\u{df}en</title><guid>a2</guid></item>\
                 </channel></rss>"
            ))
        };
        let cases: [(Vec<u8>, Option<&str>); 4] = [
            // Declared in the XML declaration.
            (
                body("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>"),
                Some("application/xml"),
            ),
            // Declared only by the HTTP charset.
            (body(""), Some("text/xml; charset=iso-8859-1")),
            // The HTTP charset wins over the declaration.
            (
                body("<?xml version=\"1.0\" encoding=\"utf-8\"?>"),
                Some("application/rss+xml; charset=\"ISO-8859-1\""),
            ),
            // Declared nowhere: not UTF-8, so read as windows-1252.
            (body(""), None),
        ];
        for (bytes, content_type) in cases {
            let feed = parse_feed(&bytes, content_type, BASE).unwrap();
            assert_eq!(feed.title.as_deref(), Some("Café"), "{content_type:?}");
            assert_eq!(feed.ttl, Some(Duration::from_secs(45 * 60)));
            let titles: Vec<_> = feed.entries.iter().map(|e| e.title.as_deref()).collect();
            assert_eq!(
                titles,
                [Some("Café crème"), Some("Übergrößen")],
                "{content_type:?}"
            );
            assert_eq!(
                feed.entries[0].published.as_deref(),
                Some("2026-11-22T09:00:00Z")
            );
            // An RSS pubDate is not an update time.
            assert_eq!(feed.entries[0].updated, None);
        }
    }

    #[test]
    fn utf16_and_utf32_documents() {
        let doc = "<?xml version=\"1.0\" encoding=\"utf-16\"?><rss version=\"2.0\"><channel>\
                   <item><title>Grüße</title><guid>g</guid></item></channel></rss>";
        let utf16le: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(doc.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let utf16be_no_bom: Vec<u8> = doc.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let utf32be: Vec<u8> = [0, 0, 0xFE, 0xFF]
            .into_iter()
            .chain(doc.chars().flat_map(|c| (c as u32).to_be_bytes()))
            .collect();
        for body in [utf16le, utf16be_no_bom, utf32be] {
            let feed = parse_feed(&body, Some("application/xml"), BASE).unwrap();
            assert_eq!(feed.entries.len(), 1);
            assert_eq!(feed.entries[0].title.as_deref(), Some("Grüße"));
        }
    }

    #[test]
    fn json_feed() {
        let doc = r#"{
            "version": "https://jsonfeed.org/version/1.1",
            "title": "My Example Feed",
            "home_page_url": "https://example.org/",
            "authors": [{"name": "Feed Author"}],
            "items": [
                {"id": "2", "title": "Second", "url": "/posts/2",
                 "content_html": "<p>Hello</p>", "date_published": "2026-11-22T10:00:00+01:00",
                 "date_modified": "2026-11-22T12:00:00Z", "tags": ["a", "b"],
                 "authors": [{"name": "Jo"}]},
                {"id": 1, "content_text": "No title here", "url": "https://example.org/1"}
            ]
        }"#;
        let feed = parse_feed(doc.as_bytes(), Some("application/feed+json"), BASE).unwrap();
        assert_eq!(feed.title.as_deref(), Some("My Example Feed"));
        let [second, first] = feed.entries.as_slice() else {
            panic!("two entries expected, got {:?}", feed.entries);
        };
        assert_eq!(second.id.as_deref(), Some("2"));
        assert_eq!(second.title.as_deref(), Some("Second"));
        assert_eq!(second.link.as_deref(), Some("https://example.org/posts/2"));
        assert_eq!(second.author.as_deref(), Some("Jo"));
        assert_eq!(second.published.as_deref(), Some("2026-11-22T09:00:00Z"));
        assert_eq!(second.updated.as_deref(), Some("2026-11-22T12:00:00Z"));
        assert_eq!(second.summary.as_deref(), Some("<p>Hello</p>"));
        assert_eq!(second.categories, ["a", "b"]);
        // JSON Feed 1.0 allowed numeric ids; an item without an author has the feed's.
        assert_eq!(first.id.as_deref(), Some("1"));
        assert_eq!(first.title, None);
        assert_eq!(first.author.as_deref(), Some("Feed Author"));
        assert_eq!(first.key, sha256_hex("1"));
    }

    #[test]
    fn rss_without_version() {
        let doc = "<rss><channel><title>T</title><item><title>One</title>\
                   <link>https://example.org/1</link></item></channel></rss>";
        let feed = parse(doc);
        assert_eq!(feed.entries.len(), 1);
        assert_eq!(feed.entries[0].title.as_deref(), Some("One"));
        assert_eq!(
            feed.entries[0].link.as_deref(),
            Some("https://example.org/1")
        );
        // feed-rs itself reads it once the version is supplied (0.93/0.94 likewise).
        for doc in [doc, &doc.replace("<rss>", "<rss version=\"0.94\">")] {
            let prepared = prepare_for_feed_rs(doc);
            let fr = run_feed_rs(prepared.as_bytes(), BASE).unwrap();
            assert_eq!(fr.entries.len(), 1, "{prepared}");
        }
        assert!(
            prepare_for_feed_rs("<rss xmlns:a=\"x\">").starts_with("<rss version=\"2.0\" xmlns:a")
        );
        assert_eq!(
            prepare_for_feed_rs("<rss version='0.93'>"),
            "<rss version=\"2.0\">"
        );
    }

    #[test]
    fn bare_ampersand_does_not_lose_the_feed() {
        let cases = [
            ("<title>Fish & Chips</title>", "Fish & Chips"),
            ("<title>AT&T; R&D &amp; more</title>", "AT&T; R&D & more"),
            ("<title>Caf&eacute; &nbsp;open</title>", "Café open"),
            // Escaped markup in an untyped RSS title is taken as HTML, as feed readers do.
            ("<title><![CDATA[A & B &amp; C]]></title>", "A & B & C"),
        ];
        for (title, expected) in cases {
            let doc = format!(
                "<rss version=\"2.0\"><channel><item>{title}<guid>x</guid></item>\
                 <item><title>Other & more</title><guid>y</guid></item></channel></rss>"
            );
            let feed = parse(&doc);
            assert_eq!(feed.entries.len(), 2, "{title}");
            assert_eq!(feed.entries[0].title.as_deref(), Some(expected), "{title}");
            // feed-rs reads the repaired document too.
            let repaired = prepare_for_feed_rs(&repair_xml(&doc));
            assert_eq!(
                run_feed_rs(repaired.as_bytes(), BASE)
                    .unwrap()
                    .entries
                    .len(),
                2
            );
        }
    }

    #[test]
    fn entry_without_guid_or_link_has_a_stable_key() {
        let doc = "<rss version=\"2.0\"><channel>\
                   <item><title>No id</title><description>Body one</description></item>\
                   <item><title>No id</title><description>Body two</description></item>\
                   </channel></rss>";
        let first = parse(doc);
        let second = parse(doc);
        assert_eq!(first.entries.len(), 2);
        for (a, b) in first.entries.iter().zip(&second.entries) {
            assert_eq!(a.id, None);
            assert_eq!(a.link, None);
            assert_eq!(a.key, b.key);
            assert_eq!(a.key.len(), 64);
            assert!(a
                .key
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        assert_ne!(first.entries[0].key, first.entries[1].key);
        assert_eq!(first.entries[0].key, sha256_hex("No idBody one"));
        // Nor does the feed-rs reading carry an invented id.
        let fr = run_feed_rs(doc.as_bytes(), BASE).unwrap();
        assert!(fr.entries.iter().all(|e| e.id.is_empty()));
        // An entry with a link but no guid is keyed by its link.
        let feed =
            parse("<rss version=\"2.0\"><channel><item><link>/a</link></item></channel></rss>");
        assert_eq!(feed.entries[0].key, sha256_hex("https://example.org/a"));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let deep = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
        let deep_rss = format!(
            "<rss version=\"2.0\"><channel><item>{}</item></channel></rss>",
            "<x>".repeat(70_000)
        );
        let ampersands = "&".repeat(1_000_000);
        let errors: Vec<&[u8]> = vec![
            b"",
            b"   \n",
            b"not xml at all",
            b"\x00\x01\x02\xff\xfe\xfd",
            b"\xff\xfe<\x00",
            b"<html><body>Hello</body></html>",
            b"{not json",
            b"[1, 2]",
            b"{\"hello\": \"world\"}",
            b"<?xml version=\"1.0\"?>",
            b"<",
            deep.as_bytes(),
            ampersands.as_bytes(),
        ];
        for body in errors {
            let result = parse_feed(body, None, BASE);
            assert!(
                result.is_err(),
                "{:?}: {result:?}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
        }
        // Broken but readable documents are read; hostile ones just must not panic.
        let truncated =
            parse("<rss version=\"2.0\"><channel><item><title>Cut off</title><guid>c</guid>");
        assert_eq!(truncated.entries[0].title.as_deref(), Some("Cut off"));
        let started = std::time::Instant::now();
        assert!(!matches!(
            parse_feed(deep_rss.as_bytes(), None, BASE),
            Err(FeedError::Panicked(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(10));
        // A base URL that is no URL does not matter.
        assert!(parse_feed(QA_ATOM.as_bytes(), None, "not a url").is_ok());
    }

    #[test]
    fn relative_links_are_resolved() {
        let rss = r#"<rss version="2.0"><channel>
            <item><link>/posts/1</link></item>
            <item><link>2?x=1#top</link></item>
            <item><guid>../archive/3</guid></item>
            <item><guid isPermaLink="false">4</guid></item>
            <item><link>javascript:alert(1)</link></item>
            <item><link>HTTP://Other.example/x</link></item>
        </channel></rss>"#;
        let links: Vec<_> = parse(rss).entries.into_iter().map(|e| e.link).collect();
        assert_eq!(
            links,
            [
                Some("https://example.org/posts/1".into()),
                Some("https://example.org/feeds/2?x=1#top".into()),
                Some("https://example.org/archive/3".into()),
                None,
                None,
                Some("http://Other.example/x".into()),
            ]
        );
        let atom = r#"<feed xmlns="http://www.w3.org/2005/Atom" xml:base="http://blog.example/a/b/">
            <entry><id>tag:1</id><link href="../c.html"/></entry>
            <entry xml:base="/root/"><id>tag:2</id><link rel="alternate" type="text/html" href="d"/>
              <link rel="enclosure" href="e.mp3"/></entry>
            <entry><id>tag:3</id><link rel="self" href="self"/></entry>
            <entry><id>http://blog.example/4</id></entry>
        </feed>"#;
        let links: Vec<_> = parse(atom).entries.into_iter().map(|e| e.link).collect();
        assert_eq!(
            links,
            [
                Some("http://blog.example/a/c.html".into()),
                Some("http://blog.example/root/d".into()),
                None,
                Some("http://blog.example/4".into()),
            ]
        );
    }

    #[test]
    fn rss_1_and_atom_0_3() {
        let rdf = r#"<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
                 xmlns="http://purl.org/rss/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/">
            <channel rdf:about="https://example.org/"><title>RDF</title></channel>
            <item rdf:about="https://example.org/1"><title>One</title>
              <link>https://example.org/1</link><dc:creator>Ann</dc:creator>
              <dc:date>2026-11-22T10:00:00Z</dc:date></item>
        </rdf:RDF>"#;
        let feed = parse(rdf);
        assert_eq!(feed.title.as_deref(), Some("RDF"));
        let e = &feed.entries[0];
        assert_eq!(e.id.as_deref(), Some("https://example.org/1"));
        assert_eq!(e.author.as_deref(), Some("Ann"));
        assert_eq!(e.updated.as_deref(), Some("2026-11-22T10:00:00Z"));
        let atom03 = r#"<feed version="0.3" xmlns="http://purl.org/atom/ns#">
            <title>Old</title>
            <entry><id>tag:x</id><title type="text/html" mode="escaped">&lt;i&gt;Hi&lt;/i&gt;</title>
              <issued>2003-12-13T08:29:29-04:00</issued><modified>2003-12-13T18:30:02Z</modified>
              <link rel="alternate" type="text/html" href="http://example.org/x"/></entry>
        </feed>"#;
        let e = &parse(atom03).entries[0];
        assert_eq!(e.title.as_deref(), Some("Hi"));
        assert_eq!(e.published.as_deref(), Some("2003-12-13T12:29:29Z"));
        assert_eq!(e.updated.as_deref(), Some("2003-12-13T18:30:02Z"));
        assert_eq!(e.link.as_deref(), Some("http://example.org/x"));
    }

    #[test]
    fn dates() {
        let cases = [
            ("2026-11-22T10:00:00Z", Some("2026-11-22T10:00:00Z")),
            (
                "2026-11-22T10:00:00.123+01:30",
                Some("2026-11-22T08:30:00Z"),
            ),
            ("2026-11-22 10:00:00 -0500", Some("2026-11-22T15:00:00Z")),
            ("2026-11-22", Some("2026-11-22T00:00:00Z")),
            ("2026-11", Some("2026-11-01T00:00:00Z")),
            ("2026", Some("2026-01-01T00:00:00Z")),
            ("20261122T10:00:00Z", Some("2026-11-22T10:00:00Z")),
            ("2003-13-01T15:51:30-05:00", Some("2004-01-01T20:51:30Z")),
            (
                "Sun, 22 Nov 2026 10:00:00 GMT",
                Some("2026-11-22T10:00:00Z"),
            ),
            (
                "Sun, 22 Nov 2026 10:00:00 +0100",
                Some("2026-11-22T09:00:00Z"),
            ),
            ("22 Nov 2026 10:00 EST", Some("2026-11-22T15:00:00Z")),
            (
                "Thu, 09 Feb 06 23:59:45 +0000",
                Some("2006-02-09T23:59:45Z"),
            ),
            (
                "Fri, 09 Feb 96 23:59:45 +0000",
                Some("1996-02-09T23:59:45Z"),
            ),
            (
                "Sunday, 22 November 2026 10:00:00 PST",
                Some("2026-11-22T18:00:00Z"),
            ),
            ("Sun Nov 22 10:00:00 2026", Some("2026-11-22T10:00:00Z")),
            ("Sun, 30 Feb 2026 10:00:00 GMT", None),
            ("07-01T01:55:07-05:00", None),
            ("insert date here", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(
                parse_date(text).map(format_rfc3339).as_deref(),
                expected,
                "{text:?}"
            );
        }
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn oldest_first_order() {
        let entry = |key: &str, published: Option<&str>| FeedEntry {
            key: key.into(),
            published: published.map(str::to_string),
            ..FeedEntry::default()
        };
        // Newest first, as feeds list them; "b" carries no time.
        let mut entries = vec![
            entry("d", Some("2026-11-22T10:00:03Z")),
            entry("c", Some("2026-11-22T10:00:02Z")),
            entry("b", None),
            entry("a", Some("2026-11-22T10:00:01Z")),
        ];
        order_oldest_first(&mut entries);
        let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);
        // Without times: reverse document order.
        let mut entries = vec![entry("3", None), entry("2", None), entry("1", None)];
        order_oldest_first(&mut entries);
        let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["1", "2", "3"]);
        // A feed listed oldest first keeps that order when dated.
        let mut entries = vec![
            entry("x", Some("2026-01-01T00:00:00Z")),
            entry("y", Some("2026-01-02T00:00:00Z")),
        ];
        order_oldest_first(&mut entries);
        assert_eq!(entries[0].key, "x");
    }

    #[test]
    fn entry_data_shape() {
        let feed = parse(QA_ATOM);
        let data = entry_data(&feed.entries[1], "stackoverflow");
        let keys: Vec<_> = data.as_object().unwrap().keys().cloned().collect();
        let mut expected = [
            "id",
            "title",
            "link",
            "author",
            "published",
            "updated",
            "summary",
            "categories",
            "feed",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(data["feed"], "stackoverflow");
        assert_eq!(data["categories"], json!([]));
        assert_eq!(data["published"], "2026-11-22T09:58:30Z");
        let empty = entry_data(&FeedEntry::default(), "f");
        assert_eq!(empty["id"], Value::Null);
        assert_eq!(empty["updated"], Value::Null);
    }
}
