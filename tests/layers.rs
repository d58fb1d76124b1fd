//! The module layers of `src/lib.rs`'s crate doc, checked against every
//! `crate::` path in the code (tests excluded): each top-level module is in the
//! table, no module uses one from a layer above its own, and no two modules use
//! each other, directly or around a cycle.
//!
//!   cargo test --test layers -- --nocapture      (prints the import graph)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `module -> layer` from the table in lib.rs (`//! | 3. serving | `proxy`, ... |`).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//! | ")) {
        let Some((rank, rest)) = line.split_once(". ") else {
            continue;
        };
        let Ok(rank) = rank.parse::<usize>() else {
            continue;
        };
        let modules = rest.split('|').nth(1).unwrap_or("");
        for m in modules.split(',') {
            let m = m.trim().trim_matches('`');
            if !m.is_empty() {
                out.insert(m.to_owned(), rank);
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file's non-test code names as `crate::<module>`.
fn uses(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i + "crate::".len()..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if tail.starts_with('{') {
            // `use crate::{a, b::c}`
            let group = &tail[1..tail.find('}').unwrap_or(tail.len())];
            for part in group.split(',') {
                let m = part.trim().split("::").next().unwrap_or("").trim();
                if !m.is_empty() {
                    out.insert(m.to_owned());
                }
            }
        } else if !name.is_empty() {
            out.insert(name);
        }
        rest = tail;
    }
    out
}

#[test]
fn module_imports_point_down_the_layers_and_never_around_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let layer = layers(&lib);
    assert!(
        layer.len() > 10,
        "the layer table in lib.rs was not found: {layer:?}"
    );
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        assert!(
            layer.contains_key(&module),
            "`{module}` is not in lib.rs's layer table"
        );
        let text = std::fs::read_to_string(file).unwrap();
        for used in uses(&text) {
            if used != module {
                graph.entry(module.clone()).or_default().insert(used);
            }
        }
    }
    let mut upward = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            let (a, b) = (layer[from], *layer.get(to).unwrap_or(&0));
            println!("{from} (layer {a}) -> {to} (layer {b})");
            if b < a {
                upward.push(format!("{from} (layer {a}) uses {to} (layer {b})"));
            }
        }
    }
    assert!(upward.is_empty(), "upward imports: {upward:#?}");
    // No cycles: depth-first search with colours.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match state.get(node) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {node}", path.join(" -> ")),
            _ => {}
        }
        state.insert(node, 1);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, state, path);
        }
        path.pop();
        state.insert(node, 2);
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        visit(node, &graph, &mut state, &mut Vec::new());
    }
}
