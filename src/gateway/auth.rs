//! Client authentication: `Authorization: Bearer <client key>`, compared in
//! constant time against every configured key. With no `[[keys]]`, auth is
//! off and every request runs as the key name `anonymous`.

use std::sync::Arc;

use http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use crate::config::KeyConfig;
use crate::error::GatewayError;

pub struct ClientKeys {
    keys: Vec<(Arc<str>, Box<[u8]>)>,
    anonymous: Arc<str>,
}

impl ClientKeys {
    pub fn new(keys: &[KeyConfig]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| (Arc::from(k.name.as_str()), k.key.expose().as_bytes().into()))
                .collect(),
            anonymous: Arc::from("anonymous"),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The name of the key that authenticates this request.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<str>, GatewayError> {
        if self.keys.is_empty() {
            return Ok(self.anonymous.clone());
        }
        let token = bearer(headers).ok_or(GatewayError::MissingApiKey)?;
        // Compare against every key, without stopping at a match, so the
        // time taken does not say which key (or how much of one) matched.
        let mut found = None;
        for (name, key) in &self.keys {
            if bool::from(key.as_ref().ct_eq(token)) {
                found = Some(name);
            }
        }
        found.cloned().ok_or(GatewayError::InvalidApiKey)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use http::HeaderValue;

    fn keys() -> ClientKeys {
        ClientKeys::new(&[
            KeyConfig {
                name: "app-a".into(),
                key: Secret::new("sk-aaaaaaaa"),
            },
            KeyConfig {
                name: "app-b".into(),
                key: Secret::new("sk-bbbbbbbb"),
            },
        ])
    }

    fn with(auth: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(auth));
        h
    }

    #[test]
    fn finds_the_key_name() {
        assert_eq!(&*keys().authenticate(&with("Bearer sk-bbbbbbbb")).unwrap(), "app-b");
        assert_eq!(&*keys().authenticate(&with("bearer  sk-aaaaaaaa ")).unwrap(), "app-a");
    }

    #[test]
    fn rejects_missing_and_wrong_keys() {
        assert!(matches!(
            keys().authenticate(&HeaderMap::new()),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            keys().authenticate(&with("Basic sk-aaaaaaaa")),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            keys().authenticate(&with("Bearer sk-aaaaaaa")),
            Err(GatewayError::InvalidApiKey)
        ));
        assert!(matches!(
            keys().authenticate(&with("Bearer ")),
            Err(GatewayError::MissingApiKey)
        ));
    }

    #[test]
    fn no_keys_means_anonymous() {
        let open = ClientKeys::new(&[]);
        assert_eq!(&*open.authenticate(&HeaderMap::new()).unwrap(), "anonymous");
    }
}
