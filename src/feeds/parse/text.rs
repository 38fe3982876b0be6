//! Text helpers of the feed parser: URL resolution, HTML to plain text, base64.

use super::decode::{html_entity, reference_len, tag_end};

pub(super) fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Resolves a (possibly relative) reference against a base the way feed readers do (RFC 3986
/// resolution as Python's `urljoin` performs it): no re-encoding or normalisation beyond
/// dot segments, a lowercase scheme, and empty `?`/`#` dropped. A reference with a scheme
/// other than the base's is kept as written.
pub(super) fn resolve_url(base: &str, href: &str) -> String {
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
    let scheme = r
        .scheme
        .clone()
        .unwrap_or_else(|| b.scheme.clone().unwrap_or_default());
    if Some(&scheme) != b.scheme.as_ref() && !(r.scheme.is_none() && b.scheme.is_none()) {
        return lowercase_scheme(&href);
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
        let query = if r.query.is_empty() {
            &b.query
        } else {
            &r.query
        };
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

fn lowercase_scheme(url: &str) -> String {
    match url.find(':') {
        Some(i) if has_scheme(&url[..=i]) => {
            format!("{}{}", url[..i].to_ascii_lowercase(), &url[i..])
        }
        _ => url.to_string(),
    }
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

fn unsplit_url(
    scheme: &str,
    netloc: Option<&str>,
    path: &str,
    query: &str,
    fragment: &str,
) -> String {
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
pub(super) fn safe_link(base: &str, href: &str) -> Option<String> {
    let url = resolve_url(base, href);
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase())?;
    const ACCEPTABLE: [&str; 44] = [
        "file", "ftp", "gopher", "h323", "hdl", "http", "https", "imap", "magnet", "mailto", "mms",
        "news", "nntp", "prospero", "rsync", "rtsp", "rtspu", "sftp", "shttp", "sip", "sips",
        "snews", "svn", "svn+ssh", "telnet", "wais", "aim", "callto", "cvs", "facetime", "feed",
        "git", "gtalk", "irc", "ircs", "irc6", "itms", "msnim", "skype", "ssh", "smb", "ymsg",
        "ws", "wss",
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
pub(super) fn html_to_text(html: &str) -> String {
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
        let is_markup =
            next.is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '/' | '!' | '?'));
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

pub(super) fn base64_decode(s: &str) -> Option<Vec<u8>> {
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
