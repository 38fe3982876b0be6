//! The source scan: the document as a small element tree, and the entry fields read from it
//! (what the document says, with the precedence rules of the common feed readers).

use super::dates::{format_rfc3339, parse_date};
use super::decode::{html_entity, reference_len, XML_ENTITIES};
use super::text::{base64_decode, collapse_ws, html_to_text, resolve_url, safe_link};
use super::FeedEntry;

pub(super) const NS_ATOM10: &str = "http://www.w3.org/2005/Atom";
pub(super) const NS_ATOM03: &str = "http://purl.org/atom/ns#";
pub(super) const NS_RSS10: &str = "http://purl.org/rss/1.0/";
pub(super) const NS_RSS090: &str = "http://my.netscape.com/rdf/simple/0.9/";
pub(super) const NS_RSS_USERLAND: &str = "http://backend.userland.com/rss2";
pub(super) const NS_RSS_HARVARD: &str = "http://blogs.law.harvard.edu/tech/rss";
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
            out.push_str(&format!(
                " {k}=\"{}\"",
                escape_text(v).replace('"', "&quot;")
            ));
        }
        out.push('>');
        out.push_str(&self.inner_markup());
        out.push_str(&format!("</{}>", self.local));
    }
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Debug)]
pub(super) enum ScanError {
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
            Event::Text(t) if skipped_depth == 0 => push_text(&mut stack, &t.xml10_content()),
            Event::CData(t) if skipped_depth == 0 => push_text(&mut stack, &t.xml10_content()),
            Event::GeneralRef(r) if skipped_depth == 0 => {
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
pub(super) struct RawFeed {
    pub(super) title: Option<String>,
    pub(super) ttl_minutes: Option<u64>,
    pub(super) entries: Vec<FeedEntry>,
}

pub(super) fn scan_document(text: &str, base_url: &str) -> Result<RawFeed, ScanError> {
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
    let plain = if is_html { html_to_text(&value) } else { value };
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
        name = name
            .replace("()", "")
            .replace("<>", "")
            .replace("&lt;&gt;", "");
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
