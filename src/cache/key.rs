//! The cache key: SHA-256 over everything that can change an answer.
//!
//! A cryptographic hash because with `scope = "global"` a collision would
//! serve one client another's answer; SHA-256 from `ring`, already in the
//! tree for TLS. Each part of the input is length-prefixed, so no two
//! different inputs can concatenate to the same bytes.
//!
//! The body goes in as canonical JSON: object members sorted by key, no
//! whitespace, strings in serde_json's escaping, and a number with an
//! integral value (`0`, `0.0`, `0e5`) written as an integer. So two bodies
//! that are equal as JSON hit the same entry, and any change to any field
//! misses, unknown fields included. Only `stream_options` (relaygate sets
//! `include_usage` itself and strips the usage chunk on replay) and `user`
//! (an end-user id for the upstream's abuse tracking, not an input to the
//! answer) are left out, and only at the top level.
//!
//! The canonical form is written in one pass over the body's bytes, not
//! through a `serde_json::Value`: building the tree (a `String` per string,
//! a map per object) cost four times the hash (criterion `cache/key`).
//! Strings without an escape, nearly all of them, are copied as they are,
//! which is already serde_json's escaping of them. An object whose members
//! are in order already stays where it was written; one that is not is
//! copied once in order (and the whole body's, swapped in, not copied back).

use std::ops::Range;

use ring::digest::{Context, SHA256};

/// Bumped whenever what goes into the key, or what an entry holds, changes,
/// so that old entries in a shared Redis are never read by a new build.
pub const FORMAT_VERSION: &str = "relaygate-cache-v1";

/// Top-level body fields that do not change the answer.
const IGNORED: [&[u8]; 2] = [b"\"stream_options\"", b"\"user\""];

/// Deeper than this, the body is not canonicalised (not cached): serde's
/// own limit, which `request::parse` has already applied.
const MAX_DEPTH: usize = 128;

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

/// A body in canonical form, and what the cache's `when` needs from it.
pub struct Canonical {
    pub bytes: Vec<u8>,
    /// `temperature` is 0, or a non-null `seed` is set.
    pub deterministic: bool,
}

/// The canonical form of a JSON body; `None` if it is not one JSON value
/// (or nests deeper than serde allows).
pub fn canonical(body: &[u8]) -> Option<Canonical> {
    let mut w = Writer {
        src: body,
        pos: 0,
        out: Vec::with_capacity(body.len()),
        scratch: Vec::new(),
        members: Vec::new(),
        temperature_zero: false,
        seed: false,
    };
    w.value(0)?;
    w.skip_ws();
    (w.pos == body.len()).then_some(Canonical {
        deterministic: w.temperature_zero || w.seed,
        bytes: w.out,
    })
}

/// The key of a request whose body is `body` in canonical form.
pub fn key(parts: &KeyParts<'_>, body: &[u8]) -> Key {
    let mut h = Context::new(&SHA256);
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT_VERSION.as_bytes());
    field(parts.scope.as_bytes());
    field(parts.endpoint.as_bytes());
    field(parts.model.as_bytes());
    field(&(parts.targets.len() as u64).to_le_bytes());
    for (upstream, model) in parts.targets {
        field(upstream.as_bytes());
        field(model.as_bytes());
    }
    field(if parts.stream { b"stream" } else { b"plain" });
    field(body);
    let digest = h.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Key(out)
}

/// Writes the canonical form of `src` into `out`, value by value.
struct Writer<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// Where an object's members are put in order before going back.
    scratch: Vec<u8>,
    /// (key, whole member) as ranges of `out`, for the objects being
    /// written: one stack rather than a `Vec` per object.
    members: Vec<(Range<usize>, Range<usize>)>,
    temperature_zero: bool,
    seed: bool,
}

impl Writer<'_> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.src.get(self.pos).copied()
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.src.get(self.pos..)?.starts_with(word).then_some(())?;
        self.pos += word.len();
        self.out.extend_from_slice(word);
        Some(())
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.pos += 1;
        self.out.push(b'[');
        if self.peek()? == b']' {
            self.pos += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.out.push(b',');
                }
                b']' => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Members are written where they stand, commas between, then put in
    /// order by their canonical key (a deterministic, one-to-one function
    /// of the key, so as good an order as the decoded one) if they are not
    /// in it already. Duplicate keys are all kept, in their order: a body
    /// with one is not equal to a body without it.
    fn object(&mut self, depth: usize) -> Option<()> {
        self.pos += 1;
        let start = self.out.len();
        self.out.push(b'{');
        if self.peek()? == b'}' {
            self.pos += 1;
            self.out.push(b'}');
            return Some(());
        }
        // This object's members are `members[first..]`; a nested object's
        // go above them and are gone when it returns.
        let first = self.members.len();
        let mut sorted = true;
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let undo = self.out.len();
            if self.members.len() > first {
                self.out.push(b',');
            }
            let member_start = self.out.len();
            self.string()?;
            let key = member_start..self.out.len();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.out.push(b':');
            let value_start = self.out.len();
            self.value(depth + 1)?;
            if depth == 0 && !self.top_level_member(key.clone(), value_start) {
                self.out.truncate(undo);
            } else {
                if let Some((last, _)) = self.members[first..].last() {
                    sorted &= self.out[last.clone()] <= self.out[key.clone()];
                }
                self.members.push((key, member_start..self.out.len()));
            }
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        if sorted {
            // Already canonical where it stands: no copy.
            self.out.push(b'}');
        } else {
            let out = &self.out;
            self.members[first..].sort_by(|a, b| out[a.0.clone()].cmp(&out[b.0.clone()]));
            self.scratch.clear();
            self.scratch.reserve(self.out.len() - start + 1);
            self.scratch.push(b'{');
            for (i, (_, member)) in self.members[first..].iter().enumerate() {
                if i > 0 {
                    self.scratch.push(b',');
                }
                self.scratch.extend_from_slice(&self.out[member.clone()]);
            }
            self.scratch.push(b'}');
            if start == 0 {
                // The whole body: take the sorted copy rather than copy it back.
                std::mem::swap(&mut self.out, &mut self.scratch);
            } else {
                self.out.truncate(start);
                self.out.extend_from_slice(&self.scratch);
            }
        }
        self.members.truncate(first);
        Some(())
    }

    /// A top-level member: whether it is kept, noting what `when` needs.
    fn top_level_member(&mut self, key: Range<usize>, value_start: usize) -> bool {
        let (key, value) = (&self.out[key], &self.out[value_start..]);
        if IGNORED.contains(&key) {
            return false;
        }
        if key == b"\"temperature\"" {
            self.temperature_zero = value == b"0";
        } else if key == b"\"seed\"" {
            self.seed = value != b"null";
        }
        true
    }

    /// A string, copied when it has no escape (then it is already in
    /// serde_json's form); decoded and written again by serde_json when it
    /// has one, so `"\u00e9"`, `"\u00E9"` and `"é"` are one string.
    fn string(&mut self) -> Option<()> {
        let start = self.pos;
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            i += memchr::memchr2(b'"', b'\\', self.src.get(i..)?)?;
            if self.src[i] == b'"' {
                break;
            }
            escaped = true;
            i += 2; // the backslash and the character it escapes
        }
        self.pos = i + 1;
        let raw = &self.src[start..self.pos];
        if escaped {
            let decoded: String = serde_json::from_slice(raw).ok()?;
            serde_json::to_writer(&mut self.out, &decoded).ok()?;
        } else {
            self.out.extend_from_slice(raw);
        }
        Some(())
    }

    /// Integers as they are (`-0` as `0`); a number with a fraction or an
    /// exponent as an integer when its value is one that an f64 holds
    /// exactly, else in the shortest form that reads back as the same f64.
    fn number(&mut self) -> Option<()> {
        let start = self.pos;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.src.get(self.pos) {
            self.pos += 1;
        }
        let token = std::str::from_utf8(&self.src[start..self.pos]).ok()?;
        if token.is_empty() {
            return None;
        }
        if !token.contains(['.', 'e', 'E']) {
            self.out
                .extend_from_slice(if token == "-0" { b"0" } else { token.as_bytes() });
            return Some(());
        }
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        let f: f64 = token.parse().ok()?;
        if f.fract() == 0.0 && f.abs() < EXACT {
            self.out
                .extend_from_slice(itoa::Buffer::new().format(f as i64).as_bytes());
        } else {
            let n = serde_json::Number::from_f64(f)?;
            self.out.extend_from_slice(n.to_string().as_bytes());
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

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

    fn canon(body: &str) -> String {
        String::from_utf8(canonical(body.as_bytes()).expect("valid JSON").bytes).unwrap()
    }

    fn k(body: &str) -> Key {
        key(&parts(false), &canonical(body.as_bytes()).unwrap().bytes)
    }

    #[test]
    fn json_equal_bodies_share_a_key() {
        let a = k(r#"{"model":"m","messages":[{"role":"user","content":"hé"}],"temperature":0}"#);
        let b = k(r#"{ "temperature" : 0.0,
            "messages" : [ { "content" : "h\u00e9", "role" : "user" } ], "model" : "m", "user": "u-17",
            "stream_options": {"include_usage": true} }"#);
        assert_eq!(a, b);
        assert_eq!(k(r#"{"n":1e2,"x":"\/"}"#), k(r#"{"x":"/","n":100}"#));
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
        assert_ne!(k(&base.replace(r#""temperature":0"#, r#""temperature":0.7"#)), base_key);
        // A nested `user` (not the top-level field) is input.
        assert_ne!(
            k(&base.replace(r#""role":"user""#, r#""role":"user","user":"x""#)),
            base_key
        );
        // Array order is meaning; a duplicate key is a difference.
        assert_ne!(k(r#"{"a":[1,2]}"#), k(r#"{"a":[2,1]}"#));
        assert_ne!(k(r#"{"a":1,"a":2}"#), k(r#"{"a":2}"#));
        assert_ne!(k(r#"{"a":1,"a":2}"#), k(r#"{"a":2,"a":1}"#));
    }

    #[test]
    fn the_request_around_the_body_counts() {
        let body = canonical(br#"{"model":"m","messages":[]}"#).unwrap().bytes;
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
        assert_eq!(
            canon(r#" {"b":[1.0, 2.5, -0.0, 1e2, -0, 12, 1.5e300],"a":{"z":null,"y":"\u0041\n"},"user":"x"} "#),
            r#"{"a":{"y":"A\n","z":null},"b":[1,2.5,0,100,0,12,1.5e+300]}"#
        );
        // Left-out members first, between and last; objects in order and
        // not, at the top and inside.
        assert_eq!(
            canon(r#"{"user":"u","b":[{"y":1,"x":{"q":2,"p":1}},{"m":1,"n":2}],"stream_options":{},"a":1,"user":"v"}"#),
            r#"{"a":1,"b":[{"x":{"p":1,"q":2},"y":1},{"m":1,"n":2}]}"#
        );
        assert_eq!(canon(r#"{"user":"u"}"#), "{}");
        assert_eq!(canon(r#"{"a":{"c":1,"b":2},"b":0}"#), r#"{"a":{"b":2,"c":1},"b":0}"#);
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{ }"), "{}");
        assert_eq!(canon(r#""a\"b""#), r#""a\"b""#);
        for bad in [
            "",
            "{",
            r#"{"a":}"#,
            r#"{"a" 1}"#,
            "[1,]",
            "tru",
            "1 2",
            r#""open"#,
            r#"{"a":1,}"#,
        ] {
            assert!(canonical(bad.as_bytes()).is_none(), "{bad:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(canonical(deep.as_bytes()).is_none(), "deeper than serde's limit");
        assert_eq!(k(r#"{"model":"m"}"#).hex().len(), 64);
    }

    #[test]
    fn deterministic_requests() {
        let d = |s: &str| canonical(s.as_bytes()).unwrap().deterministic;
        assert!(d(r#"{"temperature":0}"#));
        assert!(d(r#"{"temperature":0.0}"#));
        assert!(d(r#"{"temperature": -0e3}"#));
        assert!(d(r#"{"temperature":0.7,"seed":3}"#));
        assert!(!d(r#"{"temperature":0.7}"#));
        assert!(!d(r#"{"seed":null}"#));
        assert!(!d(r#"{"x":{"temperature":0}}"#), "only the top level");
        assert!(!d(r#"{}"#), "the default temperature is not 0");
    }

    /// A canonical form built through serde_json's `Value` (keys sorted as
    /// decoded strings): the same as the one-pass form wherever keys need no
    /// escape (where the two orders agree).
    fn reference(v: &Value) -> String {
        {
            match v {
                Value::Object(map) => {
                    let mut members: Vec<(&String, &Value)> = map.iter().collect();
                    members.sort_by(|a, b| a.0.cmp(b.0));
                    let inner: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), reference(v)))
                        .collect();
                    format!("{{{}}}", inner.join(","))
                }
                Value::Array(items) => format!("[{}]", items.iter().map(reference).collect::<Vec<_>>().join(",")),
                Value::Number(n) if n.is_f64() => {
                    let f = n.as_f64().unwrap();
                    if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                        (f as i64).to_string()
                    } else {
                        n.to_string()
                    }
                }
                other => other.to_string(),
            }
        }
    }

    #[test]
    fn agrees_with_a_value_tree() {
        let bodies = [
            r#"{"model":"deepseek-chat","messages":[{"role":"system","content":"Be brief.\nReally."},{"role":"user","content":"Ünïcödé \u2603 \ud83d\ude00"}],"temperature":0.2,"max_tokens":64,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"b":{"type":"number"},"a":{"type":"string"}}}}}],"stop":null,"n":1,"top_p":1.0,"logprobs":false}"#,
            r#"{"input":["one","two",""],"model":"text-embedding-3-small","dimensions":256,"encoding_format":"float"}"#,
            r#"{"z":[[],{},[{}],{"y":[1,-2,3.25,4e-3]}],"a":"\t\"quoted\"\\"}"#,
        ];
        for body in bodies {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(canon(body), reference(&v), "{body}");
            // And again after a round trip through serde's own writer.
            let rewritten = serde_json::to_string_pretty(&v).unwrap();
            assert_eq!(canon(&rewritten), canon(body));
        }
    }

    proptest::proptest! {
        /// Any JSON value, written compact, pretty, or with its object
        /// members reversed, has one canonical form, and it is the
        /// `Value` tree's.
        #[test]
        fn one_canonical_form_per_value(v in json_value()) {
            let compact = serde_json::to_string(&v).unwrap();
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let reversed = reversed_members(&v);
            let c = canon(&compact);
            proptest::prop_assert_eq!(&c, &canon(&pretty));
            proptest::prop_assert_eq!(&c, &canon(&reversed));
            proptest::prop_assert_eq!(&c, &reference(&v));
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z0-9 \\\"\n\u{e9}\u{2603}]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `v` written with every object's members in reverse order.
    fn reversed_members(v: &Value) -> String {
        match v {
            Value::Object(map) => {
                let members: Vec<String> = map
                    .iter()
                    .rev()
                    .map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap(), reversed_members(v)))
                    .collect();
                format!("{{ {} }}", members.join(" , "))
            }
            Value::Array(items) => format!(
                "[{}]",
                items.iter().map(reversed_members).collect::<Vec<_>>().join(", ")
            ),
            other => other.to_string(),
        }
    }
}
