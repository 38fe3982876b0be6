//! Whitespace removal for JSON text that is already known to be valid.

/// Removes insignificant whitespace; `raw` must be valid JSON (checked by the caller's parser).
pub fn compact(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
        }
    }
    // Only ASCII whitespace bytes outside strings were removed, so the text is still UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn keeps_strings_and_drops_whitespace() {
        let cases = [
            ("null", "null"),
            (
                " { \"a\" : 1 ,\n\"b\":[ 1 , 2 ] } ",
                "{\"a\":1,\"b\":[1,2]}",
            ),
            ("\"a b \\\" c \"", "\"a b \\\" c \""),
            ("[\"\\\\\", \" x \"]", "[\"\\\\\",\" x \"]"),
            ("\"é ü\"", "\"é ü\""),
        ];
        for (input, want) in cases {
            assert_eq!(compact(input), want, "{input}");
            let a: serde_json::Value = serde_json::from_str(input).unwrap();
            let b: serde_json::Value = serde_json::from_str(&compact(input)).unwrap();
            assert_eq!(a, b);
        }
    }
}
