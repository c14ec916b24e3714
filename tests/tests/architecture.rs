//! The crates' modules depend on each other in one direction only: no module cycles.
//!
//! A module's dependencies are read from its source (test modules left out): `use` statements, paths
//! through `crate::`, `super::` and `self::`, and paths into its own sub-modules. A parent's
//! `pub use` of a child's items is a facade, not a dependency, and `mod` lines only declare.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`image::decode`, `""` for the crate root) -> its code without the test module.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("source folder") {
            let path = entry.expect("entry").path();
            let rel = path.strip_prefix(src).expect("inside src");
            if path.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let mut parts: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let code = std::fs::read_to_string(&path).expect("source file");
            let code = match code.find("#[cfg(test)]\nmod tests") {
                Some(i) => code[..i].to_string(),
                None => code,
            };
            out.insert(parts.join("::"), code);
        }
    }
    out
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}::{b}"),
    }
}

fn parent(m: &str) -> String {
    m.rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

/// `a::{b, c::{d, self}}` -> `a::b`, `a::c::d`, `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let t = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![t.trim_end_matches("::self").to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').expect("closing brace")];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| {
            expand(i).into_iter().map(|s| {
                if s == "self" {
                    prefix.to_string()
                } else {
                    format!("{prefix}::{s}")
                }
            })
        })
        .collect()
}

/// The module a path names, relative to module `m`, if it is one of this crate's.
fn resolve(m: &str, path: &str, known: &BTreeMap<String, String>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base = match segs.first().copied()? {
        "crate" => {
            segs.remove(0);
            String::new()
        }
        "self" => {
            segs.remove(0);
            m.to_string()
        }
        "super" => {
            let mut b = m.to_string();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b = parent(&b);
            }
            b
        }
        first if known.contains_key(&join(m, first)) => m.to_string(),
        _ => return None,
    };
    let mut found = base.clone();
    for s in segs {
        base = join(&base, s);
        if known.contains_key(&base) {
            found = base.clone();
        } else {
            break;
        }
    }
    Some(found)
}

fn dependencies(m: &str, code: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |target: Option<String>| {
        if let Some(t) = target.filter(|t| t != m) {
            out.insert(t);
        }
    };
    // Comments out (doc links name modules without depending on them).
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    for chunk in code.split(';') {
        // A chunk is one statement, with whatever item ends before it (`}` of a function).
        let use_at = chunk
            .match_indices('\n')
            .map(|(i, _)| i + 1)
            .chain([0])
            .filter(|&i| {
                let l = chunk[i..].trim_start_matches([' ', '\t']);
                l.starts_with("use ")
                    || l.starts_with("pub use ")
                    || l.starts_with("pub(crate) use ")
            })
            .max();
        let (statement, use_tree) = match use_at {
            Some(i) => (&chunk[..i], Some(chunk[i..].trim_start())),
            None => (chunk, None),
        };
        if let Some(tree) = use_tree {
            let tree = tree.strip_prefix("pub(crate) ").unwrap_or(tree);
            if let Some(tree) = tree.strip_prefix("use ") {
                for path in expand(tree) {
                    add(resolve(m, &path, known));
                }
            }
        }
        // Paths in code: identifiers joined by `::`, not preceded by another path segment.
        let bytes: Vec<char> = statement.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            let starts = (bytes[i].is_alphabetic() || bytes[i] == '_')
                && (i == 0
                    || !(bytes[i - 1].is_alphanumeric() || matches!(bytes[i - 1], '_' | ':')));
            if !starts {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < bytes.len() && (bytes[j].is_alphanumeric() || matches!(bytes[j], '_' | ':')) {
                j += 1;
            }
            let path: String = bytes[i..j].iter().collect();
            if path.contains("::") {
                add(resolve(m, &path, known));
            }
            i = j;
        }
    }
    out
}

fn cycles(src: &Path) -> Vec<Vec<String>> {
    let known = modules(src);
    let graph: BTreeMap<&String, BTreeSet<String>> = known
        .iter()
        .map(|(m, code)| (m, dependencies(m, code, &known)))
        .collect();
    // A cycle exists where a module reaches itself.
    let mut found = Vec::new();
    for start in graph.keys() {
        let mut stack = vec![(start.to_string(), vec![start.to_string()])];
        let mut seen = BTreeSet::new();
        while let Some((node, route)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == *start {
                    found.push(route.clone());
                } else if seen.insert(next.clone()) {
                    let mut r = route.clone();
                    r.push(next.clone());
                    stack.push((next.clone(), r));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["runtime", "trainer", "wasm"] {
        let found = cycles(&root.join(krate).join("src"));
        assert!(found.is_empty(), "{krate}: module cycles {found:?}");
    }
}

/// The checker sees a cycle where there is one (so that the test above can fail).
#[test]
fn a_cycle_is_found() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("image")).expect("dir");
    std::fs::write(dir.join("lib.rs"), "pub mod image;\npub mod scoring;\n").expect("write");
    std::fs::write(dir.join("scoring.rs"), "use crate::image::decode::Image;\n").expect("write");
    std::fs::write(
        dir.join("image/mod.rs"),
        "pub mod decode;\npub use decode::Image;\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("image/decode.rs"),
        "pub struct Image;\nfn f() { crate::scoring::g(); }\n",
    )
    .expect("write");
    let found = cycles(dir);
    assert!(
        found.iter().any(|c| c.contains(&"scoring".to_string())
            && c.contains(&"image::decode".to_string())),
        "{found:?}"
    );
}
