//! The cache key: SHA-256 over everything that can change an answer.
//!
//! A cryptographic hash because with `scope = "global"` a collision would
//! serve one client another's answer; SHA-256 from `ring`, already in the
//! tree for TLS. Each part of the input is length-prefixed, so no two
//! different inputs can concatenate to the same bytes.
//!
//! The body goes in as canonical JSON: object keys sorted, no whitespace,
//! strings in serde_json's escaping, and a number with an integral value
//! (`0`, `0.0`, `0e5`) written as an integer. So two bodies that are equal
//! as JSON hit the same entry, and any change to any field misses, unknown
//! fields included. Only `stream_options` (relaygate sets `include_usage`
//! itself and strips the usage chunk on replay) and `user` (an end-user id
//! for the upstream's abuse tracking, not an input to the answer) are left
//! out, and only at the top level.

use std::io::Write;

use ring::digest::{Context, SHA256};
use serde_json::Value;

/// Bumped whenever what goes into the key, or what an entry holds, changes,
/// so that old entries in a shared Redis are never read by a new build.
pub const FORMAT_VERSION: &str = "relaygate-cache-v1";

/// Top-level body fields that do not change the answer.
const IGNORED: [&str; 2] = ["stream_options", "user"];

/// A cache key: the SHA-256 of the request's inputs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key(pub [u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
        out
    }
}

/// What identifies a request besides its body.
pub struct KeyParts<'a> {
    /// The client key's name with `scope = "key"`, `*` with `"global"`.
    pub scope: &'a str,
    /// The endpoint's path, e.g. `/v1/chat/completions`.
    pub endpoint: &'a str,
    /// The client-facing model.
    pub model: &'a str,
    /// The model's targets in order: (upstream name, upstream model).
    pub targets: &'a [(&'a str, &'a str)],
    pub stream: bool,
}

/// The key of a request whose body parsed as `body`.
pub fn key(parts: &KeyParts<'_>, body: &Value) -> Key {
    let mut h = Hasher(Context::new(&SHA256));
    h.field(FORMAT_VERSION.as_bytes());
    h.field(parts.scope.as_bytes());
    h.field(parts.endpoint.as_bytes());
    h.field(parts.model.as_bytes());
    h.field(&(parts.targets.len() as u64).to_le_bytes());
    for (upstream, model) in parts.targets {
        h.field(upstream.as_bytes());
        h.field(model.as_bytes());
    }
    h.field(if parts.stream { b"stream" } else { b"plain" });
    // The body last and unprefixed: nothing follows it.
    write_body(&mut h, body);
    let digest = h.0.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Key(out)
}

/// The canonical JSON of a body: what `key` hashes after its prefix.
pub fn canonical(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_body(&mut out, body);
    out
}

/// The body's canonical JSON, less the top-level fields in `IGNORED`.
fn write_body(w: &mut impl Write, body: &Value) {
    match body {
        Value::Object(map) => {
            let mut kept: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| !IGNORED.contains(&k.as_str())).collect();
            kept.sort_unstable_by(|a, b| a.0.cmp(b.0));
            write_object(w, kept);
        }
        other => write_canonical(w, other),
    }
}

struct Hasher(Context);

impl Hasher {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_object(w: &mut impl Write, members: Vec<(&String, &Value)>) {
    let _ = w.write_all(b"{");
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            let _ = w.write_all(b",");
        }
        write_string(w, k);
        let _ = w.write_all(b":");
        write_canonical(w, v);
    }
    let _ = w.write_all(b"}");
}

fn write_string(w: &mut impl Write, s: &str) {
    // Writing a `str` as JSON fails only if the writer does; neither of
    // relaygate's writers (a hasher, a Vec) can.
    let _ = serde_json::to_writer(&mut *w, s);
}

fn write_canonical(w: &mut impl Write, v: &Value) {
    match v {
        Value::Null => {
            let _ = w.write_all(b"null");
        }
        Value::Bool(b) => {
            let _ = w.write_all(if *b { b"true" } else { b"false" });
        }
        Value::Number(n) => write_number(w, n),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            let _ = w.write_all(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    let _ = w.write_all(b",");
                }
                write_canonical(w, item);
            }
            let _ = w.write_all(b"]");
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            write_object(w, members);
        }
    }
}

/// Integers as themselves; a float with an integral value that an f64
/// holds exactly as an integer; any other float in serde_json's shortest
/// round-trip form.
fn write_number(w: &mut impl Write, n: &serde_json::Number) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        if f.fract() == 0.0 && f.abs() < EXACT {
            let _ = write!(w, "{}", f as i64);
            return;
        }
    }
    let _ = write!(w, "{n}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(stream: bool) -> KeyParts<'static> {
        KeyParts {
            scope: "app",
            endpoint: "/v1/chat/completions",
            model: "m",
            targets: &[("up", "m-up")],
            stream,
        }
    }

    fn k(body: &str) -> Key {
        key(&parts(false), &serde_json::from_str(body).unwrap())
    }

    #[test]
    fn json_equal_bodies_share_a_key() {
        let a = k(r#"{"model":"m","messages":[{"role":"user","content":"hé"}],"temperature":0}"#);
        let b = k(r#"{ "temperature" : 0.0,
            "messages" : [ { "content" : "h\u00e9", "role" : "user" } ], "model" : "m", "user": "u-17",
            "stream_options": {"include_usage": true} }"#);
        assert_eq!(a, b);
    }

    #[test]
    fn every_field_counts() {
        let base = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let base_key = k(base);
        for (field, value) in [
            ("seed", "1"),
            ("max_tokens", "10"),
            ("top_p", "0.5"),
            ("logit_bias", r#"{"50256":-100}"#),
            ("tools", r#"[{"type":"function","function":{"name":"f"}}]"#),
            ("response_format", r#"{"type":"json_object"}"#),
            ("n", "2"),
            ("stop", r#"["x"]"#),
            ("frequency_penalty", "0.1"),
            ("x_unknown_field", "true"),
        ] {
            let changed = base.replacen('{', &format!(r#"{{"{field}":{value},"#), 1);
            assert_ne!(k(&changed), base_key, "{field} must be in the key");
        }
        // A changed value of one sampling field misses too.
        assert_ne!(k(&base.replace(r#""temperature":0"#, r#""temperature":0.7"#)), base_key);
        // Nested `user` (a message's name) is the input, not the ignored top-level field.
        assert_ne!(
            k(&base.replace(r#""role":"user""#, r#""role":"user","user":"x""#)),
            base_key
        );
    }

    #[test]
    fn the_request_around_the_body_counts() {
        let body: Value = serde_json::from_str(r#"{"model":"m","messages":[]}"#).unwrap();
        let base = key(&parts(false), &body);
        assert_ne!(
            key(&parts(true), &body),
            base,
            "streamed and plain answers are separate"
        );
        let changes: [&dyn Fn(&mut KeyParts<'static>); 4] = [
            &|p| p.scope = "other-app",
            &|p| p.endpoint = "/v1/completions",
            &|p| p.model = "m2",
            &|p| p.targets = &[("up", "m-up-2")],
        ];
        for change in changes {
            let mut p = parts(false);
            change(&mut p);
            assert_ne!(key(&p, &body), base);
        }
        // Length prefixes: moving a byte between two parts changes the key.
        let mut p = parts(false);
        p.targets = &[("upm", "-up")];
        assert_ne!(key(&p, &body), base);
    }

    #[test]
    fn canonical_form() {
        let v: Value =
            serde_json::from_str(r#"{"b":[1.0, 2.5, -0.0, 1e2],"a":{"z":null,"y":"\u0041"},"user":"x"}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical(&v)).unwrap(),
            r#"{"a":{"y":"A","z":null},"b":[1,2.5,0,100]}"#
        );
        assert_eq!(k(r#"{"model":"m"}"#).hex().len(), 64);
    }
}
