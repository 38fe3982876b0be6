//! Standard Webhooks signatures: `v1,{base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")}`,
//! where the key is the base64 part of a `whsec_…` secret. Receivers verify them with the
//! convention's own libraries, so this must match the reference implementations byte for byte.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// A signing secret, parsed once (its key bytes kept, its text form for showing once).
#[derive(Clone)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a webhook secret is \"whsec_\" followed by base64 of 24 to 64 bytes")]
pub struct BadSecret;

impl Secret {
    /// 32 random bytes.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::random();
        Self {
            text: format!("{PREFIX}{}", STANDARD.encode(key)),
            key: key.to_vec(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, BadSecret> {
        let b64 = text.strip_prefix(PREFIX).ok_or(BadSecret)?;
        let key = STANDARD.decode(b64).map_err(|_| BadSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(BadSecret);
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// The `whsec_…` form, to show the user once.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `v1,{signature}` of one delivery attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable_hmac(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    panic!("HMAC-SHA256 accepts keys of every length")
}

/// The `webhook-signature` header: one signature per secret, space-separated.
pub fn signature_header(secrets: &[&Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector published with the Standard Webhooks specification and used by its
    /// reference libraries.
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rotation_signs_with_both_and_bad_secrets_are_refused() {
        let old = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = Secret::generate();
        assert!(new.as_str().starts_with("whsec_"));
        assert_eq!(Secret::parse(new.as_str()).unwrap().key, new.key);
        let header = signature_header(&[&new, &old], "a:b:1", 5, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], old.sign("a:b:1", 5, b"{}"));
        assert_ne!(parts[0], parts[1]);
        for bad in [
            "",
            "whsec_",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_YWJj",
        ] {
            assert!(Secret::parse(bad).is_err(), "{bad}");
        }
    }
}
