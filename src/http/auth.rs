//! Who is asking: API keys (every right), HS256 client tokens (pattern-scoped), or nobody.

use axum::http::request::Parts;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;

use super::error::ApiError;
use crate::config::AuthConfig;
use crate::hub::pattern::{any_matches, Pattern};
use crate::hub::types::ChannelName;

#[derive(Debug, Clone)]
pub enum Principal {
    /// An API key, or anyone when no keys are configured.
    Admin,
    /// A client token's rights.
    Client {
        subscribe: Vec<Pattern>,
        publish: Vec<Pattern>,
    },
    Anonymous,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[allow(dead_code)]
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

pub struct Auth {
    config: AuthConfig,
    /// Keys that sign client tokens: the configured secret and the hub's own (for run tokens).
    token_keys: Vec<DecodingKey>,
}

impl Auth {
    pub fn new(config: AuthConfig, extra_token_secrets: Vec<Vec<u8>>) -> Self {
        let mut token_keys: Vec<DecodingKey> = config
            .token_secret
            .iter()
            .map(|s| DecodingKey::from_secret(s.as_bytes()))
            .collect();
        token_keys.extend(
            extra_token_secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s)),
        );
        Self { config, token_keys }
    }

    pub fn is_open(&self) -> bool {
        self.config.is_open()
    }

    /// Resolves a presented credential (bearer value or `?token=`), if any.
    pub fn principal(&self, credential: Option<&str>) -> Result<Principal, ApiError> {
        let Some(credential) = credential.filter(|c| !c.is_empty()) else {
            return Ok(if self.is_open() {
                Principal::Admin
            } else {
                Principal::Anonymous
            });
        };
        if self
            .config
            .api_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), credential.as_bytes()))
        {
            return Ok(Principal::Admin);
        }
        if self.token_keys.is_empty() {
            return if self.is_open() {
                Ok(Principal::Admin)
            } else {
                Err(ApiError::Forbidden("unknown API key".into()))
            };
        }
        let claims = self.decode(credential)?;
        let parse = |list: &[String]| -> Result<Vec<Pattern>, ApiError> {
            list.iter()
                .map(|p| {
                    Pattern::parse(p)
                        .map_err(|e| ApiError::Forbidden(format!("token has a bad pattern: {e}")))
                })
                .collect()
        };
        Ok(Principal::Client {
            subscribe: parse(&claims.subscribe)?,
            publish: parse(&claims.publish)?,
        })
    }

    fn decode(&self, token: &str) -> Result<Claims, ApiError> {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 0;
        let mut last = None;
        for key in &self.token_keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = Some(e),
            }
        }
        let reason = match last.as_ref().map(|e| e.kind()) {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => "token expired",
            Some(jsonwebtoken::errors::ErrorKind::InvalidSignature) => "token signature is invalid",
            _ => "credential is neither an API key nor a valid token",
        };
        Err(ApiError::Forbidden(reason.into()))
    }

    pub fn is_public(&self, channel: &ChannelName) -> bool {
        any_matches(&self.config.public, channel)
    }

    pub fn can_read(&self, who: &Principal, channel: &ChannelName) -> Result<(), ApiError> {
        let allowed = match who {
            Principal::Admin => true,
            Principal::Client { subscribe, .. } => {
                any_matches(subscribe, channel) || self.is_public(channel)
            }
            Principal::Anonymous => self.is_public(channel),
        };
        self.verdict(who, allowed, || format!("not allowed to read {channel}"))
    }

    pub fn can_publish(&self, who: &Principal, channel: &ChannelName) -> Result<(), ApiError> {
        let allowed = match who {
            Principal::Admin => true,
            Principal::Client { publish, .. } => any_matches(publish, channel),
            Principal::Anonymous => false,
        };
        self.verdict(who, allowed, || {
            format!("not allowed to publish to {channel}")
        })
    }

    pub fn require_admin(&self, who: &Principal) -> Result<(), ApiError> {
        self.verdict(who, matches!(who, Principal::Admin), || {
            "this operation needs an API key".into()
        })
    }

    /// Any credential at all (for listing endpoints that are not per-channel).
    pub fn require_any(&self, who: &Principal) -> Result<(), ApiError> {
        self.verdict(who, !matches!(who, Principal::Anonymous), || {
            "credentials required".into()
        })
    }

    fn verdict(
        &self,
        who: &Principal,
        allowed: bool,
        why: impl FnOnce() -> String,
    ) -> Result<(), ApiError> {
        match (allowed, who) {
            (true, _) => Ok(()),
            (false, Principal::Anonymous) => Err(ApiError::Unauthorized(format!(
                "{}: send an API key or token as 'Authorization: Bearer …' or '?token='",
                why()
            ))),
            (false, _) => Err(ApiError::Forbidden(why())),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credential of a request: `Authorization: Bearer …`, else `?token=`.
pub fn credential(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value);
        return Some(token.trim().to_owned());
    }
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn auth(keys: &[&str], secret: Option<&str>, public: &[&str]) -> Auth {
        Auth::new(
            AuthConfig {
                api_keys: keys.iter().map(|s| s.to_string()).collect(),
                token_secret: secret.map(str::to_owned),
                public: public.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
            },
            Vec::new(),
        )
    }

    fn token(secret: &str, exp: i64, subscribe: &[&str], publish: &[&str]) -> String {
        let claims =
            serde_json::json!({"sub":"u","exp":exp,"subscribe":subscribe,"publish":publish});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn keys_tokens_and_public() {
        let a = auth(&["k1"], Some("s"), &["pub:*"]);
        let ch = |s| ChannelName::parse(s).unwrap();
        let anon = a.principal(None).unwrap();
        assert!(a.can_read(&anon, &ch("pub:x")).is_ok());
        assert!(matches!(
            a.can_read(&anon, &ch("priv")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.can_publish(&anon, &ch("pub:x")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(a.principal(Some("k1")), Ok(Principal::Admin)));
        let exp = crate::clock::now_ms() / 1000 + 60;
        let t = a
            .principal(Some(&token("s", exp, &["acc:1"], &["chat:*"])))
            .unwrap();
        assert!(a.can_read(&t, &ch("acc:1")).is_ok());
        assert!(matches!(
            a.can_read(&t, &ch("acc:2")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(a.can_publish(&t, &ch("chat:lobby")).is_ok());
        assert!(matches!(a.require_admin(&t), Err(ApiError::Forbidden(_))));
        let expired = token("s", exp - 3600, &["*"], &[]);
        assert!(
            matches!(a.principal(Some(&expired)), Err(ApiError::Forbidden(m)) if m.contains("expired"))
        );
        let forged = token("other", exp, &["*"], &[]);
        assert!(matches!(
            a.principal(Some(&forged)),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            a.principal(Some("garbage")),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn open_mode_lets_everyone_in() {
        let a = auth(&[], None, &[]);
        assert!(matches!(a.principal(None), Ok(Principal::Admin)));
        assert!(matches!(
            a.principal(Some("whatever")),
            Ok(Principal::Admin)
        ));
    }
}
