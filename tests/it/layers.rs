//! The module layers of docs/architecture.md, held: every `crate::` path in src/ points to a
//! module of the same layer or a lower one, and no two modules import each other, directly or
//! through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first, as docs/architecture.md lists them.
const LAYERS: &[(&str, &[&str])] = &[
    ("front", &["cli", "server", "whoami", "logging", "admin"]),
    ("pipeline", &["gateway", "listen"]),
    ("handlers", &["portal", "tunnel", "proxy", "sshd"]),
    ("shared", &["state", "respond"]),
    ("services", &["session", "audit", "mitigate", "identity", "store", "upstream", "body", "certs", "acme", "ssh"]),
    ("pure", &["request", "route", "policy", "config", "names"]),
    ("base", &["secret", "clock", "tls_client", "metrics", "db"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/portal/mfa.rs` → `portal`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules a file's code names with `crate::`, outside comments and its tests.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut found = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.is_empty() {
                // `use crate::{a, b::c}`: each name in the braces.
                let group = rest.trim_start_matches('{').split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let name = item.trim().split("::").next().unwrap_or("").trim();
                    if !name.is_empty() {
                        found.insert(name.to_string());
                    }
                }
            } else {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn imports_point_down_the_layers_and_never_round_in_a_cycle() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let from = module_of(&src, file);
        if from == "lib" || from == "main" {
            continue;
        }
        let from_layer = layer_of(&from).unwrap_or_else(|| panic!("module {from} is in no layer of the list"));
        for to in imports(&std::fs::read_to_string(file).unwrap()) {
            if to == from {
                continue;
            }
            let to_layer = layer_of(&to).unwrap_or_else(|| panic!("{}: crate::{to} is in no layer", file.display()));
            if to_layer < from_layer {
                upward.push(format!(
                    "{} ({}) uses crate::{to} ({})",
                    file.display(),
                    LAYERS[from_layer].0,
                    LAYERS[to_layer].0
                ));
            }
            graph.entry(from.clone()).or_default().insert(to);
        }
    }
    assert!(upward.is_empty(), "imports that point up the layers:\n{}", upward.join("\n"));
    // Within a layer, imports may go either way, but never round: walk from each module and
    // see whether it comes back.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph[start].iter().collect();
        while let Some(m) = todo.pop() {
            assert_ne!(m, start, "an import cycle through {start}");
            if seen.insert(m.clone()) {
                todo.extend(graph.get(m).into_iter().flatten());
            }
        }
    }
    // The check reads what it should: the gateway uses the portal, the portal the state.
    assert!(graph["gateway"].contains("portal") && graph["portal"].contains("state"));
}
