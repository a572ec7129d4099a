//! The shape of the code, held: no module of trainer/ or launch/ depends on
//! itself through others (between folders, and between the files of a
//! folder), and no function there is longer than 80 lines except the flat
//! tables named here. Read from the sources (`crate::` and `super::` paths,
//! tests excluded), so a change that breaks either fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sigma_tests::repo_root;

/// Functions allowed past 80 lines: flat tables, each saying so in a comment.
const FLAT_TABLES: &[&str] = &[
    // One launch per training kernel with its argument list.
    "trainer/src/kernels/training.rs:launch_kernel",
];

const MAX_FN_LINES: usize = 80;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file under `src` (`model/mod.rs` -> [model]).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The source without comments, string contents and the test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let (mut in_str, mut in_line_comment) = (false, false);
    while let Some(c) = chars.next() {
        if in_line_comment {
            if c == '\n' {
                in_line_comment = false;
                out.push('\n');
            }
            continue;
        }
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                '\n' => out.push('\n'),
                _ => {}
            }
            continue;
        }
        match c {
            '/' if chars.peek() == Some(&'/') => in_line_comment = true,
            '"' => {
                in_str = true;
                out.push('"');
            }
            // A char literal holding a quote or brace must not start a string or a block.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.len() >= 2 && rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                    out.push_str("' '");
                } else if rest.starts_with('\\') && rest.chars().nth(2) == Some('\'') {
                    chars.next();
                    chars.next();
                    chars.next();
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The module paths a file names through `crate::` and `super::`.
fn references(code: &str, here: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    for (i, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            continue;
        }
        let (base, rest) = if code[i..].starts_with("crate::") {
            (Vec::new(), &code[i + 7..])
        } else {
            // `super::` is the parent module (of `a/b.rs`: `a`; of `a/mod.rs`: the root).
            let mut m = here.to_vec();
            m.pop();
            let mut rest = &code[i + 7..];
            while let Some(r) = rest.strip_prefix("super::") {
                m.pop();
                rest = r;
            }
            (m, rest)
        };
        let group = |r: &str| -> Vec<String> {
            // `{a, b::c}` at the top level of the group.
            let mut items = Vec::new();
            let (mut depth, mut cur) = (0, String::new());
            for ch in r.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            continue;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            items.push(std::mem::take(&mut cur));
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        items.push(std::mem::take(&mut cur));
                        continue;
                    }
                    _ => {}
                }
                cur.push(ch);
            }
            items
        };
        if rest.starts_with('{') {
            for item in group(rest) {
                let mut p = base.clone();
                p.extend(ident(&item));
                out.insert(p);
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let mut p = base.clone();
            p.extend(ident(&rest[..end]));
            out.insert(p);
        }
    }
    out
}

/// Module dependency edges of the crate at `src`, between modules cut to
/// `depth` path components.
fn edges(src: &Path, depth: usize) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let node = |path: &[String]| -> Vec<String> {
        for n in (1..=path.len()).rev() {
            if modules.contains(&path[..n].to_vec()) {
                return path[..n.min(depth)].to_vec();
            }
        }
        Vec::new()
    };
    let mut out: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let here = module_of(src, f);
        let text = std::fs::read_to_string(f).expect("read");
        let from = node(&here);
        for r in references(&code(&text), &here) {
            let to = node(&r);
            if !from.is_empty() && !to.is_empty() && from != to {
                out.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    out
}

/// The modules on a cycle, if any (depth-first search).
fn a_cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    fn visit(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).expect("on the stack");
                    let mut c: Vec<String> = stack[at..].iter().map(|x| x.join("::")).collect();
                    c.push(m.join("::"));
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_depends_on_itself_through_others() {
    for krate in ["trainer/src", "launch/src"] {
        for depth in [1, 2] {
            let g = edges(&repo_root().join(krate), depth);
            assert!(
                !g.is_empty(),
                "{krate}: no dependencies found (the parser is broken)"
            );
            if let Some(c) = a_cycle(&g) {
                panic!(
                    "{krate}: a module cycle at depth {depth}: {}",
                    c.join(" -> ")
                );
            }
        }
    }
    // The checker sees a cycle when there is one.
    let mut g = edges(&repo_root().join("trainer/src"), 1);
    let (model, engine) = (vec!["model".to_string()], vec!["engine".to_string()]);
    assert!(
        g.get(&engine).is_some_and(|s| s.contains(&model)),
        "engine uses model"
    );
    g.entry(model).or_default().insert(engine);
    assert!(a_cycle(&g).is_some(), "a planted cycle is found");
}

/// (function, first line, length) of every function of `text` longer than `max` lines.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let code = code(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .trim_start_matches("const ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ")
            .trim_start_matches("extern \"\" ");
        let Some(rest) = t.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !started && l.contains(';') && !l.contains('{') {
                break; // a declaration without a body
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if started && depth == 0 {
                if j - i + 1 > max {
                    out.push((name.clone(), i + 1, j - i + 1));
                }
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_a_screen_but_the_flat_tables() {
    let mut long = Vec::new();
    for krate in ["trainer/src", "launch/src"] {
        let mut files = Vec::new();
        rust_files(&repo_root().join(krate), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            let rel = f
                .strip_prefix(repo_root())
                .expect("in the repo")
                .display()
                .to_string();
            for (name, line, n) in long_functions(&text, MAX_FN_LINES) {
                if !FLAT_TABLES.contains(&format!("{rel}:{name}").as_str()) {
                    long.push(format!("{rel}:{line} {name} ({n} lines)"));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
    // The measure finds a long function when there is one.
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let text = format!("fn long() {{\n{body}}}\n");
    assert_eq!(long_functions(&text, MAX_FN_LINES).len(), 1);
}

/// The process environment is read in one module, `sigma_data::env`
/// (data/src/env.rs): no other source file of the workspace calls
/// `std::env::var`, `var_os` or `vars`.
#[test]
fn the_environment_is_read_in_one_module() {
    let mut readers = Vec::new();
    for krate in ["data/src", "trainer/src", "launch/src"] {
        let mut files = Vec::new();
        rust_files(&repo_root().join(krate), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            let code = code(&text);
            let reads = ["env::var(", "env::var_os(", "env::vars("]
                .iter()
                .any(|p| code.contains(&format!("std::{p}")));
            let rel = f
                .strip_prefix(repo_root())
                .expect("in the repo")
                .display()
                .to_string();
            if reads && rel != "data/src/env.rs" {
                readers.push(rel);
            }
        }
    }
    assert!(
        readers.is_empty(),
        "read the environment through sigma_data::env, not in: {readers:?}"
    );
}
