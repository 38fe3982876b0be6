//! Bytes to repaired XML text: charset detection and decoding, then the repairs (bare `&`,
//! HTML entities, DTD-declared entities) that keep one stray character from losing a feed.

/// Byte range of the root element's start tag (`<name ...>`).
pub(super) fn root_start_tag(text: &str) -> Option<(usize, usize)> {
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
pub(super) fn tag_end(tag: &str) -> Option<usize> {
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

pub(super) fn attr_in_tag(tag: &str, name: &str) -> Option<String> {
    attr_span(tag, name).map(|(_, _, value)| value)
}

pub(super) fn remove_attr_from_tag(tag: &str, name: &str) -> String {
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

/// Decodes a body to text: BOM, then the HTTP charset, then the XML declaration, then UTF-8.
/// Also drops the BOM and the declaration's `encoding` (the text is UTF-8 now).
pub(super) fn decode(body: &[u8], content_type: Option<&str>) -> String {
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
        return encoding_rs::UTF_16BE
            .decode_without_bom_handling(rest)
            .0
            .into_owned();
    }
    if let Some(rest) = body.strip_prefix(b"\xFF\xFE") {
        return encoding_rs::UTF_16LE
            .decode_without_bom_handling(rest)
            .0
            .into_owned();
    }
    if body.starts_with(b"\x00\x00\x00\x3C") {
        return decode_utf32(body, true);
    }
    if body.starts_with(b"\x3C\x00\x00\x00") {
        return decode_utf32(body, false);
    }
    if body.starts_with(b"\x00\x3C\x00") {
        return encoding_rs::UTF_16BE
            .decode_without_bom_handling(body)
            .0
            .into_owned();
    }
    if body.starts_with(b"\x3C\x00") && body.get(3) == Some(&0) {
        return encoding_rs::UTF_16LE
            .decode_without_bom_handling(body)
            .0
            .into_owned();
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
pub(super) fn media_type(content_type: &str) -> String {
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

/// Escapes bare `&` and turns HTML-only named entities into character references, outside
/// CDATA sections, comments and processing instructions.
pub(super) fn repair_xml(text: &str) -> String {
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

pub(super) const XML_ENTITIES: [&str; 5] = ["amp", "lt", "gt", "quot", "apos"];

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
pub(super) fn reference_len(s: &str) -> Option<(usize, Option<&str>)> {
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

pub(super) fn html_entity(name: &str) -> Option<char> {
    HTML_ENTITIES
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .and_then(|i| char::from_u32(HTML_ENTITIES[i].1))
}

/// The HTML 4 named entities (name, code point), sorted by name for binary search.
#[rustfmt::skip]
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
