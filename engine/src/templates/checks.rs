//! The load-time checks on template sources: what makes a template broken before it is
//! ever rendered.
//!
//! Two dangers are refused here rather than at render time. Data put in a URL attribute
//! without `{{link …}}` would make email a phishing relay; partials that include each
//! other (through named, inline or template partials) would overflow the stack at render
//! time and take the process down, and a dynamic partial (`{{> (expr)}}`) cannot be
//! checked for that, so it is refused too. These read the Handlebars source as text: the
//! checks are deliberately conservative rather than a full parser.

use std::collections::{HashMap, HashSet};

/// Why `source` (from `file`) is refused for choosing its partial at render time, if it is.
pub(super) fn dynamic_partial_refusal(file: &str, source: &str) -> Option<String> {
    has_dynamic_partial(source).then(|| {
        format!(
            "{file}: a dynamic partial ({{{{> (…)}}}}) cannot be checked for cycles; name the partial"
        )
    })
}

/// Why `source` (from `file`) is refused for putting data in a URL without `{{link …}}`,
/// if it is.
pub(super) fn unchecked_link_refusal(file: &str, source: &str) -> Option<String> {
    unchecked_link(source).map(|attribute| {
        format!("{file}: {attribute}: a URL built from data must go through {{{{link …}}}}")
    })
}

/// Attributes whose value a mail client may load or follow as a URL. `style` is among them
/// (`url(...)`), and so is `content` (`<meta http-equiv=refresh content="0;url=...">`).
/// The HTML a templating plugin returns is held to the same list (`html`).
pub(super) const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "srcset",
    "imagesrcset",
    "action",
    "formaction",
    "background",
    "poster",
    "cite",
    "data",
    "xlink:href",
    "ping",
    "manifest",
    "codebase",
    "archive",
    "longdesc",
    "lowsrc",
    "dynsrc",
    "usemap",
    "icon",
    "profile",
    "style",
    "content",
];

/// The first URL attribute (see [`URL_ATTRIBUTES`]) whose value puts data in it without the
/// `link` helper, as written. Attribute names are matched case-insensitively, with any
/// whitespace around `=`.
fn unchecked_link(source: &str) -> Option<String> {
    for (eq, _) in source.match_indices('=') {
        let before = source[..eq].trim_end();
        let name_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_')))
            .map_or(0, |i| i + 1);
        let name = &before[name_start..];
        // An attribute name follows whitespace inside a tag, never `{{`-syntax or text.
        let preceded_by_space = before[..name_start].ends_with(char::is_whitespace);
        if !preceded_by_space || !URL_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            continue;
        }
        let rest = source[eq + 1..].trim_start();
        let (quote, body) = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &rest[1..]),
            _ => (None, rest),
        };
        let end = match quote {
            Some(q) => body.find(q).unwrap_or(body.len()),
            None => body
                .find(|c: char| c.is_whitespace() || c == '>')
                .unwrap_or(body.len()),
        };
        let value = &body[..end];
        let unchecked = value.match_indices("{{").any(|(i, _)| {
            let tag = value[i + 2..].trim_start_matches(['{', '~']).trim_start();
            !(tag.starts_with("link ") || tag.starts_with('!'))
        });
        if unchecked {
            return Some(format!("{name}=\"{value}\""));
        }
    }
    None
}

/// Does `source` include a partial chosen at render time (`{{> (expr)}}`)?
fn has_dynamic_partial(source: &str) -> bool {
    source.match_indices("{{").any(|(i, _)| {
        let tag = source[i + 2..].trim_start_matches(['~', '#']).trim_start();
        tag.strip_prefix('>')
            .is_some_and(|after| after.trim_start().starts_with('('))
    })
}

/// Inline partials defined in `source`: `{{#*inline "name"}}body{{/inline}}`.
pub(super) fn inline_partials(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{#*inline") {
        rest = &rest[start + "{{#*inline".len()..];
        let Some(close) = rest.find("}}") else { break };
        let name = rest[..close]
            .trim()
            .trim_matches(['"', '\'', '~'])
            .to_owned();
        rest = &rest[close + 2..];
        let end = rest.find("{{/inline}}").unwrap_or(rest.len());
        out.push((name, rest[..end].to_owned()));
        rest = &rest[end..];
    }
    out
}

/// Names of the partials a template source includes (`{{> name}}`, `{{#> name}}`).
fn partial_references(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        rest = &rest[start + 2..];
        let tag = rest.trim_start_matches(['~', '#']).trim_start();
        if let Some(after) = tag.strip_prefix('>') {
            let name: String = after
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// A cycle among the partials, as the chain of names, if there is one.
pub(super) fn partial_cycle(partials: &HashMap<String, (String, String)>) -> Option<Vec<String>> {
    fn visit(
        name: &str,
        partials: &HashMap<String, (String, String)>,
        path: &mut Vec<String>,
        done: &mut HashSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == name) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(name.to_owned());
            return Some(cycle);
        }
        if done.contains(name) {
            return None;
        }
        let (_, source) = partials.get(name)?;
        path.push(name.to_owned());
        for next in partial_references(source) {
            if let Some(cycle) = visit(&next, partials, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(name.to_owned());
        None
    }
    let mut done = HashSet::new();
    let mut names: Vec<&String> = partials.keys().collect();
    names.sort();
    names
        .into_iter()
        .find_map(|name| visit(name, partials, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchecked_link_names_the_attribute_as_written() {
        assert_eq!(
            unchecked_link("<a HREF = \"{{url}}\">x</a>").as_deref(),
            Some("HREF=\"{{url}}\"")
        );
        assert_eq!(
            unchecked_link("<a href=https://x.example/{{p}}>x</a>").as_deref(),
            Some("href=\"https://x.example/{{p}}\"")
        );
        // Through the helper, in a comment, in another attribute, or in text: fine.
        for fine in [
            "<a href=\"{{link url}}\">x</a>",
            "<a href=\"{{! a comment }}https://x.example/\">x</a>",
            "<img alt=\"{{name}}\" src=\"https://cdn.example/logo.png\">",
            "<p>a = {{name}}</p>",
        ] {
            assert_eq!(unchecked_link(fine), None, "{fine}");
        }
    }

    #[test]
    fn dynamic_partials_and_references_are_found() {
        assert!(has_dynamic_partial("{{> (lookup this \"which\")}}"));
        assert!(has_dynamic_partial("{{#> ( which ) }}x{{/x}}"));
        assert!(!has_dynamic_partial("{{> footer}}"));
        assert_eq!(
            partial_references("{{> a}} {{#> b/c}}x{{/b/c}} {{~> d-e }} {{x}}"),
            ["a", "b/c", "d-e"]
        );
        assert_eq!(
            inline_partials("{{#*inline \"x\"}}body {{> x}}{{/inline}} rest"),
            [("x".to_owned(), "body {{> x}}".to_owned())]
        );
    }

    #[test]
    fn partial_cycle_returns_the_chain() {
        let set = |pairs: &[(&str, &str)]| -> HashMap<String, (String, String)> {
            pairs
                .iter()
                .map(|(n, s)| (n.to_string(), (format!("{n}.hbs"), s.to_string())))
                .collect()
        };
        assert_eq!(
            partial_cycle(&set(&[("a", "{{> b}}"), ("b", "{{#> a}}x{{/a}}")])),
            Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()])
        );
        // A diamond is not a cycle, and a missing partial is Handlebars' error, not ours.
        assert_eq!(
            partial_cycle(&set(&[
                ("a", "{{> b}}{{> c}}"),
                ("b", "{{> d}}"),
                ("c", "{{> d}}"),
                ("d", "{{> missing}}"),
            ])),
            None
        );
    }
}
