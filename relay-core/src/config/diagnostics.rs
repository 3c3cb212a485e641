//! Configuration errors as an operator should read them.

use super::*;

/// An operator's view of configuration errors: the key as written in the
/// file (`smtp.max_mesage_size`, not figment's `default.` profile), where
/// it is (file and line, or the environment variable), the nearest known
/// key for a misspelling, and the accepted forms of a duration. TOML
/// syntax errors keep their multi-line caret layout.
pub(super) fn describe(e: figment::Error, file: Option<&Path>, text: Option<&str>) -> String {
    e.into_iter()
        .map(|one| describe_one(&one, file, text))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_one(e: &figment::Error, file: Option<&Path>, text: Option<&str>) -> String {
    use figment::error::Kind;
    let key = e.path.join(".");
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    let place = if from_env {
        format!(
            "environment variable BACKUPMX_{}",
            e.path.join("__").to_ascii_uppercase()
        )
    } else {
        let line = text.and_then(|t| key_line(t, &e.path));
        match (file, line) {
            (Some(f), Some(l)) => format!("{}:{l}", f.display()),
            (Some(f), None) => f.display().to_string(),
            (None, Some(l)) => format!("line {l}"),
            (None, None) => "configuration".to_string(),
        }
    };
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            let hint = nearest(field, expected)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            let section = key.rsplit_once('.').map_or("the top level", |(s, _)| s);
            format!(
                "{place}: unknown key `{key}`{hint}; keys of {section}: {}",
                expected.join(", ")
            )
        }
        Kind::InvalidValue(actual, expected) | Kind::InvalidType(actual, expected)
            if expected.contains("duration") =>
        {
            format!(
                "{place}: `{key}` = {actual} is not a duration; write it like \"90s\", \"5m\", \"2h\", \"2d\" or \"1h 30m\""
            )
        }
        Kind::Message(m) if m.contains("TOML parse error") => {
            // Multi-line on purpose: the caret points at the mistake.
            format!("{place}: {}", m.trim_end())
        }
        kind => {
            if key.is_empty() {
                format!("{place}: {kind}")
            } else {
                format!("{place}: `{key}`: {kind}")
            }
        }
    }
}

/// The line (1-based) where the last key of `path` is set in TOML `text`,
/// preferring its own `[section]`.
fn key_line(text: &str, path: &[String]) -> Option<usize> {
    let last = path.last()?;
    let section = path[..path.len().saturating_sub(1)].join(".");
    let mut current = String::new();
    let mut anywhere = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if k.trim() == last {
            if current == section {
                return Some(i + 1);
            }
            anywhere.get_or_insert(i + 1);
        }
    }
    anywhere
}

/// The known key closest to a misspelt one, if it is close enough.
fn nearest<'a>(field: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(field, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

// Runtime settings. Every conversion from the file's shape to the shape
// the code runs with is here, so a setting has one path from the file and
// runtime types keep no defaults of their own.
