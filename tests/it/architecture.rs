//! The one-way rule (docs/ARCHITECTURE.md): every top-level module of the
//! crate has a tier, and a module may name only modules of lower tiers. So
//! the module graph has no cycle, and a layer cannot reach into the app.
//!
//! A small test over the source rather than a tool: `cargo-modules` and
//! `cargo-depgraph` need a build of their own (minutes on CI's two cores)
//! and know no tiers, only cycles. This reads every `crate::` path in
//! `src/` (in `use` lines and inline, test modules included), with
//! comments and strings stripped, in about 10 ms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bottom to top. A module may depend on the modules listed before it and
/// on none after it. Adding a module to `src/` means placing it here.
const TIERS: &[(&str, &str)] = &[
    ("outcome", "how a status or error counts: metrics, retries, the breaker"),
    ("net", "the accept loop and the stall timer"),
    ("ratelimit", "rate-limit rules and engine"),
    ("budget", "spend budgets: reserve, settle, periods"),
    ("telemetry", "metrics, access log, ledger, traces, windows"),
    ("config", "the validated config"),
    ("error", "the errors relaygate generates, as OpenAI JSON"),
    ("request", "the request body, parsed once"),
    ("usage", "token usage and cost"),
    ("sse", "the SSE reader"),
    ("cache", "the response cache: key, entries, backends, single flight"),
    ("sim", "the simulated upstream"),
    ("upstream", "one upstream: pool, breaker, one attempt"),
    ("stack", "the tower layers around each attempt"),
    ("shadow", "mirroring to a candidate upstream"),
    ("gateway", "the path of one proxied request"),
    ("edge", "server, routes, admin, health"),
    ("app", "build and serve"),
    ("cmd", "the commands"),
];

fn src_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library's source files, with the top-level module each belongs to.
/// `main.rs` and `bin/` are outside the library.
fn library_files() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut dirs = vec![src_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(src_dir()).unwrap().to_path_buf();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .into_owned();
            if first == "bin" || first == "main.rs" || first == "lib.rs" {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((first.trim_end_matches(".rs").to_owned(), path));
            }
        }
    }
    out.sort();
    out
}

/// Rust source with comments, string and char literals blanked out, so that
/// a path in a doc comment or a message does not count as a dependency.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // A raw string: r"…", r#"…"#.
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                i += 2 + hashes;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => {
                // A char literal ('x', '\n', '\u{..}'), not a lifetime.
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("' '");
            }
            _ => {
                let ch = src[i..].chars().next().unwrap();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The top-level modules a file names through `crate::`, with a line each.
fn dependencies(code: &str) -> Vec<(String, usize)> {
    let mut deps = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `my_crate::`
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::X, b};`
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        deps.push((name, n + 1));
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                deps.push((name, n + 1));
            }
        }
    }
    deps
}

fn tier_of(module: &str) -> Option<usize> {
    TIERS.iter().position(|(m, _)| *m == module)
}

/// What `lib.rs` re-exports at the crate root, for `crate::build_app` and the like.
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("build_app", "app"),
    ("App", "app"),
    ("AppState", "app"),
    ("Config", "config"),
];

#[test]
fn every_module_has_a_tier() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub mod ")
                .or_else(|| l.trim().strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() >= 10, "lib.rs declares {declared:?}");
    for m in &declared {
        assert!(
            tier_of(m).is_some(),
            "src/{m}: place it in TIERS (tests/architecture.rs)"
        );
    }
    for (m, _) in TIERS {
        assert!(declared.contains(m), "TIERS names {m}, which lib.rs does not declare");
    }
}

#[test]
fn imports_point_down_the_tiers() {
    let mut violations = Vec::new();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (module, path) in library_files() {
        let from = tier_of(&module).unwrap_or_else(|| panic!("{}: no tier for {module}", path.display()));
        let code = code_only(&std::fs::read_to_string(&path).unwrap());
        for (dep, line) in dependencies(&code) {
            let dep = ROOT_ITEMS
                .iter()
                .find(|(item, _)| *item == dep)
                .map_or(dep.clone(), |(_, m)| (*m).to_owned());
            if dep == module {
                continue;
            }
            let Some(to) = tier_of(&dep) else {
                violations.push(format!("{}:{line}: crate::{dep} is not a known module", rel(&path)));
                continue;
            };
            *edges.entry((module.clone(), dep.clone())).or_default() += 1;
            if to >= from {
                violations.push(format!(
                    "{}:{line}: {module} (tier {from}) uses {dep} (tier {to}); imports must point down",
                    rel(&path)
                ));
            }
        }
    }
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
    // The graph is not empty: the parser still finds dependencies.
    assert!(edges.contains_key(&("gateway".into(), "stack".into())), "{edges:?}");
    assert!(edges.contains_key(&("stack".into(), "upstream".into())), "{edges:?}");
}

fn rel(path: &Path) -> String {
    path.strip_prefix(src_dir().parent().unwrap())
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn the_parser_sees_through_comments_strings_and_groups() {
    let src = r##"
use crate::{config::Config, stack};
// use crate::commented;
/* crate::blocked /* nested */ crate::still */
let s = "crate::quoted";
let r = r#"crate::raw"#;
let c = '"'; let lifetime: &'a str = x; crate::inline::f();
other_crate::not_ours();
"##;
    let deps: Vec<String> = dependencies(&code_only(src)).into_iter().map(|(d, _)| d).collect();
    assert_eq!(deps, ["config", "stack", "inline"]);
}
