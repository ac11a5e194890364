//! `docs/configuration.md` against the code's own definitions, so the reference cannot rot:
//! - every flag of `lumen head|worker|serve|deploy|status --help` has a table row
//!   `` | `--flag` | `ENV` | `default` | `` with exactly the environment variable and default the
//!   binary prints (empty cells where it prints none);
//! - every serve-config field (the `pub` fields of the serve config's structs in
//!   `head/src/config/mod.rs`, their serde aliases, and the engine options of
//!   `worker/src/engine/options.rs` that a deployment's `model:` section carries) appears in the
//!   document as `` `field` ``;
//! - every route the head serves (`.route("PATH", ...)` in `head/src/api/mod.rs` and
//!   `head/src/control/`) appears in `docs/api.md`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const COMMANDS: &[&str] = &["head", "worker", "serve", "deploy", "status"];
/// The structs of `head/src/config/mod.rs` whose fields users write.
const CONFIG_STRUCTS: &[&str] =
    &["ServeConfig", "ApplicationConfig", "DeploymentConfig", "ActorOptions", "Resources", "AutoscalingConfig"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/configuration.md")).expect("docs/configuration.md")
}

/// One option as `--help` prints it.
#[derive(Debug)]
struct Flag {
    name: String,
    env: Option<String>,
    default: Option<String>,
}

/// The text between `[{label}: ` and its closing `]` in an option's description.
fn bracket(text: &str, label: &str) -> Option<String> {
    let start = text.find(&format!("[{label}: "))? + label.len() + 3;
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_string())
}

/// Parses `lumen COMMAND --help`: each option line (`--flag <VALUE>` then its description, on
/// the same line or the next) with its `[env: NAME=]` and `[default: VALUE]`.
fn flags(command: &str) -> Vec<Flag> {
    let out = Command::new(env!("CARGO_BIN_EXE_lumen")).args([command, "--help"]).output().expect("lumen --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = help.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("--").or_else(|| trimmed.strip_prefix("-h, --")) else { continue };
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        if name == "help" {
            continue;
        }
        // The description: the rest of this line, or the next line when this one holds only the flag.
        let same_line = rest.split_once("  ").map(|(_, d)| d.trim()).unwrap_or("");
        let description = if same_line.is_empty() { lines.get(i + 1).map_or("", |l| l.trim()) } else { same_line };
        let env = bracket(description, "env").map(|e| e.trim_end_matches('=').to_string());
        found.push(Flag { name: format!("--{name}"), env, default: bracket(description, "default") });
    }
    assert!(found.len() >= 2, "parsed no flags from `lumen {command} --help`:\n{help}");
    found
}

fn cell(value: &Option<String>) -> String {
    value.as_ref().map(|v| format!(" `{v}` ")).unwrap_or_else(|| "  ".into())
}

#[test]
fn every_cli_flag_is_documented_with_its_environment_variable_and_default() {
    let doc = doc();
    let mut missing = Vec::new();
    for command in COMMANDS {
        for flag in flags(command) {
            let row = format!("| `{}` |{}|{}|", flag.name, cell(&flag.env), cell(&flag.default));
            if !doc.contains(&row) {
                missing.push(format!("lumen {command}: {row}"));
            }
        }
    }
    assert!(missing.is_empty(), "docs/configuration.md lacks these rows:\n{}", missing.join("\n"));
}

/// The `pub` field names of `struct NAME { ... }` in a Rust source, plus its serde aliases.
fn struct_fields(source: &str, name: &str) -> BTreeSet<String> {
    let start = source.find(&format!("pub struct {name} {{")).unwrap_or_else(|| panic!("struct {name}"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("end of struct")];
    let mut fields = BTreeSet::new();
    for line in body.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub ")
            && let Some((field, _)) = rest.split_once(':')
            && field.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            fields.insert(field.to_string());
        }
        let mut rest = line;
        while let Some(at) = rest.find("alias = \"") {
            let alias = &rest[at + 9..];
            let end = alias.find('"').expect("closing quote");
            fields.insert(alias[..end].to_string());
            rest = &alias[end..];
        }
    }
    fields
}

#[test]
fn every_serve_config_field_is_documented() {
    let doc = doc();
    let config = std::fs::read_to_string(root().join("head/src/config/mod.rs")).expect("head/src/config/mod.rs");
    let engine = std::fs::read_to_string(root().join("worker/src/engine/options.rs")).expect("options.rs");
    let mut fields = BTreeSet::new();
    for name in CONFIG_STRUCTS {
        fields.extend(struct_fields(&config, name));
    }
    fields.extend(struct_fields(&engine, "EngineOptions"));
    // Read by the head from the `model:` section (`DeploymentConfig::reasoning_parser`, ...).
    fields.extend(lumen_head::config::model::HEAD_OPTIONS.iter().map(|s| s.to_string()));
    assert!(fields.len() > 30, "parsed too few fields: {fields:?}");
    let missing: Vec<_> = fields.iter().filter(|f| !doc.contains(&format!("`{f}`"))).collect();
    assert!(missing.is_empty(), "docs/configuration.md does not document {missing:?}");
}

#[test]
fn every_route_of_the_head_is_in_the_api_reference() {
    let api = std::fs::read_to_string(root().join("docs/api.md")).expect("docs/api.md");
    let mut sources = vec![root().join("head/src/api/mod.rs")];
    for entry in std::fs::read_dir(root().join("head/src/control")).expect("head/src/control") {
        sources.push(entry.expect("entry").path());
    }
    let mut routes = BTreeSet::new();
    for path in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let source = std::fs::read_to_string(path).expect("source");
        for piece in source.split(".route(\"").skip(1) {
            routes.insert(piece[..piece.find('"').expect("closing quote")].to_string());
        }
    }
    assert!(routes.len() >= 15, "parsed too few routes: {routes:?}");
    // `/api/serve/applications` (no slash) is the same route as with one.
    let missing: Vec<_> = routes.iter().filter(|r| !api.contains(r.as_str())).collect();
    assert!(missing.is_empty(), "docs/api.md does not list {missing:?}");
}
