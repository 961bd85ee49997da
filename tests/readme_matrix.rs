//! The README's "client × mode: tested" table and the end-to-end tests agree:
//! every row names a `#[test]` function that exists (`file::function`, the
//! file being `tests/<file>.rs`), and every `#[test]` of the client-matrix
//! files appears in some row. The same holds for the client table of the
//! "Private registry" section and `tests/e2e_private_registry.rs`.

use std::collections::BTreeSet;
use std::path::Path;

/// The e2e files whose every test must be in the table.
const MATRIX_FILES: &[&str] = &["e2e_docker", "e2e_containerd", "e2e_podman_skopeo", "e2e_connect"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The rows of the first table from `marker` on inside the README section
/// `## {heading}`: (client, second cell, test reference).
fn table_rows(readme: &str, heading: &str, marker: &str) -> Vec<(String, String, String)> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("README has a `## {heading}` section"));
    let at = section
        .find(marker)
        .unwrap_or_else(|| panic!("the section has a table at {marker:?}"));
    let after = &section[at..];
    let mut rows = Vec::new();
    let mut header_seen = false;
    for line in after.lines().map(str::trim) {
        if !line.starts_with('|') {
            if header_seen {
                break;
            }
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        if !header_seen {
            assert_eq!(
                cells.first().map(String::as_str),
                Some("client"),
                "table header: {line}"
            );
            header_seen = true;
            continue;
        }
        if cells.iter().all(|c| c.chars().all(|ch| ch == '-' || ch == ':')) {
            continue;
        }
        assert!(cells.len() >= 3, "table row with too few cells: {line}");
        let test = cells.last().expect("cell").trim_matches('`').to_string();
        rows.push((cells[0].clone(), cells[1].clone(), test));
    }
    rows
}

/// Names of the `#[test]` functions in `tests/<file>.rs`.
fn test_functions(file: &str) -> BTreeSet<String> {
    let path = root().join("tests").join(format!("{file}.rs"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut names = BTreeSet::new();
    let mut after_test_attr = false;
    for line in text.lines().map(str::trim) {
        if line == "#[test]" {
            after_test_attr = true;
            continue;
        }
        if after_test_attr {
            if line.starts_with("#[") || line.starts_with("//") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("fn ").or_else(|| line.strip_prefix("pub fn ")) {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                names.insert(name);
            }
            after_test_attr = false;
        }
    }
    names
}

/// Every row names a test that exists; returns the names.
fn assert_rows_name_tests(rows: &[(String, String, String)]) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for (client, mode, test) in rows {
        let (file, func) = test
            .split_once("::")
            .unwrap_or_else(|| panic!("row {client} / {mode}: {test:?} is not `file::function`"));
        assert!(
            test_functions(file).contains(func),
            "row {client} / {mode} names {test}, but tests/{file}.rs has no #[test] fn {func}"
        );
        named.insert(test.clone());
    }
    named
}

#[test]
fn readme_private_registry_table_covers_every_private_registry_test() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let rows = table_rows(&readme, "Private registry", "| client |");
    let named = assert_rows_name_tests(&rows);
    for func in test_functions("e2e_private_registry") {
        let full = format!("e2e_private_registry::{func}");
        assert!(
            named.contains(&full),
            "{full} is missing from README's private registry table"
        );
    }
    for client in ["docker", "podman", "buildah", "skopeo", "containerd"] {
        assert!(
            rows.iter().any(|(c, _, _)| c == client),
            "no private registry row for {client}"
        );
    }
}

#[test]
fn readme_matrix_names_existing_tests_and_covers_every_matrix_test() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let rows = table_rows(&readme, "Using it from clients", "client × mode: tested");
    assert!(!rows.is_empty(), "the client × mode table has no rows");

    let named = assert_rows_name_tests(&rows);

    for file in MATRIX_FILES {
        for func in test_functions(file) {
            let full = format!("{file}::{func}");
            assert!(
                named.contains(&full),
                "{full} is a client-matrix test missing from README's client × mode table"
            );
        }
    }

    for client in ["docker", "containerd", "podman", "skopeo"] {
        assert!(
            rows.iter().any(|(c, m, _)| c == client && m == "transparent"),
            "no transparent-mode row for {client}"
        );
    }
}

#[test]
fn parser_reads_rows_and_test_attributes() {
    let md = "x\n## Using it from clients\n### client × mode: tested\n\n| client | mode | test |\n|---|---|---|\n| a | b | `f::g` |\n\nafter\n## Next\n";
    assert_eq!(
        table_rows(md, "Using it from clients", "client × mode: tested"),
        vec![("a".to_string(), "b".to_string(), "f::g".to_string())]
    );
}
