//! The house's layering, checked on every `cargo test`: no import circles
//! among the files of `src/`, and every module imports only from its own
//! layer or those below it (README, "Layout"):
//!
//! pure data → OS edge → wire protocol → node runtime → roles → commands.
//!
//! Paths (`crate::`, `super::`, `self::`, grouped `{…}` imports) are
//! resolved to the file that defines the module, as
//! `../shared/tools/modcycles` does; test modules (after `#[cfg(test)]`)
//! are left out, since they may reach across layers to set things up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, bottom first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "pure data",
        &[
            "keys", "limits", "ipam", "token", "state", "reach", "lograte", "mesh",
        ],
    ),
    (
        "OS edge",
        &[
            "sys",
            "shutdown",
            "store",
            "net",
            "wg",
            "firewall",
            "docker",
            "transport",
            "gateway",
            "endpoint",
            "status",
        ],
    ),
    ("wire protocol", &["control"]),
    (
        "node runtime",
        &["node", "containers", "driver", "dns", "metrics"],
    ),
    ("roles", &["hub", "site"]),
    ("commands", &["cli"]),
];

/// Pairs in one layer that must not know each other.
const STRANGERS: &[(&str, &str)] = &[("hub", "site"), ("site", "hub")];

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

struct Crate {
    /// Module path → file (relative to `src/`), for every file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// File → its text before `#[cfg(test)]`.
    text: BTreeMap<PathBuf, String>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut files = BTreeMap::new();
        let mut text = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path.strip_prefix(src).unwrap().to_path_buf();
                    let body = std::fs::read_to_string(&path).expect("source is UTF-8");
                    let body = match body.find("#[cfg(test)]") {
                        Some(i) => body[..i].to_owned(),
                        None => body,
                    };
                    files.insert(module_of(&rel), rel.clone());
                    text.insert(rel, body);
                }
            }
        }
        Crate { files, text }
    }

    /// The file that defines `module`, or its nearest parent that a file defines.
    fn file_of(&self, module: &[String]) -> Option<&PathBuf> {
        (1..=module.len())
            .rev()
            .find_map(|k| self.files.get(&module[..k]))
    }

    /// Every file that `file` takes a name from.
    fn uses(&self, file: &Path) -> BTreeSet<PathBuf> {
        let here = module_of(file);
        let text = &self.text[file];
        let mut out = BTreeSet::new();
        for (root, base) in [
            ("crate::", Vec::new()),
            ("super::", here[..here.len().saturating_sub(1)].to_vec()),
            ("self::", here.clone()),
        ] {
            let mut at = 0;
            while let Some(i) = text[at..].find(root) {
                let start = at + i;
                at = start + root.len();
                let before = text[..start].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                for path in expand(&text[at..]) {
                    let mut module = base.clone();
                    module.extend(path);
                    if let Some(f) = self.file_of(&module)
                        && f != file
                    {
                        out.insert(f.clone());
                    }
                }
            }
        }
        out
    }
}

/// The paths a `use` tail names: `a::b::{c, d::e}` gives `a::b::c`, `a::b::d::e`.
fn expand(tail: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = tail;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 {
            prefix.push(rest[..end].to_owned());
        }
        rest = &rest[end..];
        let group_now = end == 0 && rest.starts_with('{');
        if let Some(r) = rest.strip_prefix("::").or(group_now.then_some(rest)) {
            rest = r;
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let close = group
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(group.len(), |(i, _)| i);
                return split_top(&group[..close])
                    .into_iter()
                    .flat_map(|part| {
                        expand(part.trim()).into_iter().map({
                            let prefix = prefix.clone();
                            move |p| prefix.iter().cloned().chain(p).collect()
                        })
                    })
                    .collect();
            }
            continue;
        }
        return vec![prefix];
    }
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut from, mut parts) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[from..]);
    parts
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn top(file: &Path) -> String {
    module_of(file)
        .first()
        .cloned()
        .unwrap_or_else(|| "lib".into())
}

#[test]
fn every_module_has_a_layer() {
    let krate = Crate::read(&src());
    let missing: BTreeSet<String> = krate
        .text
        .keys()
        .map(|f| top(f))
        .filter(|t| t != "lib" && t != "main" && layer_of(t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "modules with no layer in tests/layers.rs: {missing:?}"
    );
}

#[test]
fn modules_import_only_their_own_layer_and_below() {
    let krate = Crate::read(&src());
    let mut wrong = Vec::new();
    for file in krate.text.keys() {
        let Some(mine) = layer_of(&top(file)) else {
            continue;
        };
        for used in krate.uses(file) {
            let theirs = top(&used);
            let stranger = STRANGERS.contains(&(top(file).as_str(), theirs.as_str()));
            if layer_of(&theirs).is_some_and(|l| l > mine) || stranger {
                wrong.push(format!(
                    "{} ({}) uses {} ({})",
                    file.display(),
                    LAYERS[mine].0,
                    used.display(),
                    layer_of(&theirs).map_or("?", |l| LAYERS[l].0)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_import_circles_among_files() {
    let krate = Crate::read(&src());
    let graph: BTreeMap<PathBuf, BTreeSet<PathBuf>> = krate
        .text
        .keys()
        .map(|f| (f.clone(), krate.uses(f)))
        .collect();
    // Depth-first search; a grey node met again closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Grey,
        Black,
    }
    fn visit(
        node: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        marks: &mut BTreeMap<PathBuf, Mark>,
        path: &mut Vec<PathBuf>,
        circles: &mut Vec<String>,
    ) {
        marks.insert(node.clone(), Mark::Grey);
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next) {
                Some(Mark::Grey) => {
                    let from = path.iter().position(|p| p == next).unwrap();
                    let names: Vec<String> = path[from..]
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    circles.push(format!("{} -> {}", names.join(" -> "), next.display()));
                }
                Some(Mark::Black) => {}
                None => visit(next, graph, marks, path, circles),
            }
        }
        path.pop();
        marks.insert(node.clone(), Mark::Black);
    }
    let (mut marks, mut circles) = (BTreeMap::new(), Vec::new());
    for node in graph.keys() {
        if !marks.contains_key(node) {
            visit(node, &graph, &mut marks, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_relative_imports() {
    // The checker itself must be able to fail: a made-up crate with a
    // circle through a grouped `super::` import.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path();
    std::fs::create_dir(src.join("cli")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod cli;\n").unwrap();
    std::fs::write(src.join("cli/mod.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(src.join("cli/a.rs"), "use super::{b::{run, X}};\n").unwrap();
    std::fs::write(src.join("cli/b.rs"), "use crate::cli::a::Y;\n").unwrap();
    let krate = Crate::read(src);
    assert!(
        krate
            .uses(Path::new("cli/a.rs"))
            .contains(Path::new("cli/b.rs"))
    );
    assert!(
        krate
            .uses(Path::new("cli/b.rs"))
            .contains(Path::new("cli/a.rs"))
    );
    assert_eq!(
        expand("x::{y, z::{p, q}};"),
        vec![
            vec!["x".to_owned(), "y".into()],
            vec!["x".into(), "z".into(), "p".into()],
            vec!["x".into(), "z".into(), "q".into()],
        ]
    );
}
