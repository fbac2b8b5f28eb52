//! The link policy applied to finished HTML: what a tenant's templating plugin returns.
//!
//! A Handlebars template cannot put data in a URL except through `{{link …}}` (refused at
//! load otherwise, `checks`), but a plugin builds its HTML as it likes, from event data
//! too. So its HTML is parsed (html5ever's tokenizer: attribute values come out with their
//! character references decoded, `&#106;avascript&colon;` as `javascript:`) and held to the
//! same rules, on every URL a mail client may follow or load: the attributes of
//! [`URL_ATTRIBUTES`], `url()` / `src()` / `@import` in `style` attributes and `<style>`
//! elements (CSS escapes decoded). Each URL must pass [`check_link`] (`https:`, a host, no
//! credentials, among the tenant's `link_domains` when it lists some); a same-document
//! `#fragment` and an empty value lead nowhere and pass. What a mail client might run, or
//! might parse otherwise than a browser, is refused outright: `<script>`, `on…` handler
//! attributes, `srcdoc`, `<meta http-equiv=refresh>`, inline `<svg>` / `<math>`, CSS
//! `expression()` and `image-set()`. Comments are checked as HTML too: Outlook renders what
//! its conditional comments (`<!--[if mso]>…<![endif]-->`) hold.
//!
//! As with `{{link}}`, a violation fails the email with the reason (nothing is silently
//! removed: the tenant sees why, and `email requeue` sends it once the plugin is fixed).

use std::cell::RefCell;

use html5ever::TokenizerResult;
use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, Tag, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer,
};

use super::checks::URL_ATTRIBUTES;
use super::helpers::check_link;

/// Why `html` may not be sent under the tenant's link policy (`link_domains`), if it may
/// not: the first violation, naming the element and attribute.
pub fn html_link_refusal(html: &str, link_domains: &[String]) -> Option<String> {
    let domains: Vec<&str> = link_domains.iter().map(String::as_str).collect();
    refusal(html, &domains)
}

fn refusal(html: &str, domains: &[&str]) -> Option<String> {
    let sink = Sink {
        domains,
        state: RefCell::new(State::default()),
    };
    let tokenizer = Tokenizer::new(sink, Default::default());
    let input = BufferQueue::default();
    input.push_back(StrTendril::from_slice(html));
    // The tokenizer pauses for a `<meta charset>` (and would for scripts, which this sink
    // never asks it to run): feed on until the input is consumed.
    while !matches!(tokenizer.feed(&input), TokenizerResult::Done) && !input.is_empty() {}
    tokenizer.end();
    let sink = &tokenizer.sink;
    let mut state = sink.state.borrow_mut();
    if state.refusal.is_none() && state.style.is_some() {
        // A `<style>` never closed: its text still counts.
        let css = state.style.take().unwrap_or_default();
        state.refusal = css_refusal(&css, sink.domains).map(|e| format!("<style>: {e}"));
    }
    state.refusal.take()
}

struct Sink<'a> {
    domains: &'a [&'a str],
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    /// The first violation; the rest of the document is not looked at.
    refusal: Option<String>,
    /// The text of the `<style>` element being read.
    style: Option<String>,
}

impl TokenSink for Sink<'_> {
    type Handle = ();

    fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
        let mut state = self.state.borrow_mut();
        if state.refusal.is_some() {
            return TokenSinkResult::Continue;
        }
        match token {
            Token::TagToken(tag) if tag.kind == TagKind::StartTag => {
                state.refusal = self.tag_refusal(&tag);
                if &*tag.name == "style" && !tag.self_closing {
                    state.style = Some(String::new());
                    // Read as text, as a browser does, so `>` in a selector is no tag.
                    return TokenSinkResult::RawData(RawKind::Rawtext);
                }
                if &*tag.name == "script" {
                    return TokenSinkResult::RawData(RawKind::ScriptData);
                }
            }
            Token::TagToken(tag) if &*tag.name == "style" => {
                let css = state.style.take().unwrap_or_default();
                state.refusal = css_refusal(&css, self.domains).map(|e| format!("<style>: {e}"));
            }
            // Outlook renders what its conditional comments hold (`<!--[if mso]>…<![endif]-->`),
            // so a comment's text is held to the rules as HTML too (each level is shorter:
            // this ends).
            Token::CommentToken(text) => {
                state.refusal = refusal(&text, self.domains).map(|e| format!("in a comment: {e}"));
            }
            Token::CharacterTokens(text) => {
                if let Some(style) = state.style.as_mut() {
                    style.push_str(&text);
                }
            }
            _ => {}
        }
        TokenSinkResult::Continue
    }
}

impl Sink<'_> {
    /// Why this start tag is refused, if it is.
    fn tag_refusal(&self, tag: &Tag) -> Option<String> {
        let element = &*tag.name;
        match element {
            "script" => return Some("has a <script> element".into()),
            "svg" | "math" => {
                return Some(format!(
                    "has an inline <{element}> element, which mail clients parse apart from HTML"
                ));
            }
            _ => {}
        }
        let attribute = |name: &str| {
            tag.attrs
                .iter()
                .find(|a| &*a.name.local == name)
                .map(|a| a.value.to_string())
        };
        if element == "meta"
            && attribute("http-equiv").is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"))
        {
            return Some("has <meta http-equiv=\"refresh\">, which navigates on its own".into());
        }
        tag.attrs.iter().find_map(|a| {
            let name = a.name.local.to_ascii_lowercase();
            attribute_refusal(element, &name, &a.value, self.domains)
                .map(|e| format!("<{element} {name}>: {e}"))
        })
    }
}

/// Why one attribute's value is refused, if it is.
fn attribute_refusal(element: &str, name: &str, value: &str, domains: &[&str]) -> Option<String> {
    if name.starts_with("on") {
        return Some(format!(
            "event handler attribute {name} (scripts are not accepted)"
        ));
    }
    match name {
        "srcdoc" => Some("a document inside an attribute is not accepted".into()),
        "style" => css_refusal(value, domains),
        // `content` is a URL only on a refresh (refused above); `<meta name=viewport
        // content=…>` is ordinary.
        "content" => None,
        "srcset" | "imagesrcset" => value
            .split(',')
            .filter_map(|candidate| candidate.split_ascii_whitespace().next())
            .find_map(|url| url_refusal(url, domains)),
        "ping" | "archive" => value
            .split_ascii_whitespace()
            .find_map(|url| url_refusal(url, domains)),
        // `<object data=…>`; the `data-*` attributes are other names.
        "data" if element != "object" => None,
        _ if URL_ATTRIBUTES.contains(&name) => url_refusal(value, domains),
        _ => None,
    }
}

/// Why a URL is refused, if it is: [`check_link`], except that a same-document `#fragment`
/// and an empty value lead nowhere.
fn url_refusal(raw: &str, domains: &[&str]) -> Option<String> {
    // HTML strips these around a URL attribute's value.
    let url = raw.trim_matches(|c: char| c.is_ascii_whitespace() || c.is_ascii_control());
    if url.is_empty() || url.starts_with('#') {
        return None;
    }
    check_link(url, domains).err()
}

/// Why CSS text is refused, if it is: each `url()`, `src()` and `@import` target must pass
/// [`url_refusal`]; `expression()` and `image-set()` are refused. Comments are dropped and
/// escapes decoded first (`u\72 l(` is `url(`), so they hide nothing.
fn css_refusal(css: &str, domains: &[&str]) -> Option<String> {
    let text = unescape_css(&strip_css_comments(css));
    // ASCII lowercasing keeps every byte offset, so `lower` indexes `text`.
    let lower = text.to_ascii_lowercase();
    for function in ["expression(", "image-set("] {
        if lower.contains(function) {
            return Some(format!("CSS {function}…) is not accepted"));
        }
    }
    for function in ["url(", "src("] {
        for (at, _) in lower.match_indices(function) {
            let url = css_argument(&text[at + function.len()..]);
            if let Some(e) = url_refusal(url, domains) {
                return Some(e);
            }
        }
    }
    for (at, _) in lower.match_indices("@import") {
        let rest = text[at + "@import".len()..].trim_start();
        if let Some(quote @ ('"' | '\'')) = rest.chars().next() {
            let url = rest[1..].split(quote).next().unwrap_or_default();
            if let Some(e) = url_refusal(url, domains) {
                return Some(e);
            }
        }
    }
    None
}

/// The argument of a CSS function, from just after its `(`: a quoted string, or the text
/// up to `)`.
fn css_argument(rest: &str) -> &str {
    let rest = rest.trim_start();
    match rest.chars().next() {
        Some(quote @ ('"' | '\'')) => rest[1..].split(quote).next().unwrap_or_default(),
        _ => rest.split(')').next().unwrap_or_default().trim_end(),
    }
}

/// CSS without its `/* … */` comments (an unclosed one runs to the end, as in CSS).
fn strip_css_comments(css: &str) -> String {
    let mut out = String::with_capacity(css.len());
    let mut rest = css;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = match rest[start + 2..].find("*/") {
            Some(end) => &rest[start + 2 + end + 2..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// CSS escapes decoded: `\` and up to six hex digits (one whitespace after them is part of
/// the escape), `\` and a newline (a line continuation: dropped), `\` and any other
/// character (that character).
fn unescape_css(css: &str) -> String {
    let mut out = String::with_capacity(css.len());
    let mut chars = css.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let mut hex = String::new();
        while hex.len() < 6
            && let Some(d) = chars.peek().filter(|d| d.is_ascii_hexdigit())
        {
            hex.push(*d);
            chars.next();
        }
        if hex.is_empty() {
            match chars.next() {
                Some('\n') | None => {}
                Some(other) => out.push(other),
            }
            continue;
        }
        let value = u32::from_str_radix(&hex, 16).unwrap_or(0xFFFD);
        out.push(
            char::from_u32(value)
                .filter(|c| *c != '\0')
                .unwrap_or('\u{FFFD}'),
        );
        if chars.peek().is_some_and(|w| w.is_ascii_whitespace()) {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(html: &str) -> Option<String> {
        html_link_refusal(html, &["shop.example".to_owned()])
    }

    #[test]
    fn clean_html_within_the_policy_passes() {
        for html in [
            "<p>Hi <a href=\"https://shop.example/o/1\">order</a></p>",
            "<a href='https://www.shop.example/x?a=1&amp;b=2'>x</a>",
            "<img src=https://cdn.shop.example/logo.png alt=''>",
            "<a href=\"#top\">top</a> <a href=\"\">self</a> <a name=x>anchor</a>",
            "<meta name=viewport content=\"width=device-width\">",
            "<td style=\"color: red; background: url('https://shop.example/bg.png')\">x</td>",
            "<style>a > b { background: url(https://shop.example/a.png) } @import 'https://shop.example/s.css';</style>",
            "<div data-order=\"javascript:not-a-url\">x</div>",
            "<img srcset=\"https://shop.example/a.png 1x, https://shop.example/b.png 2x\">",
            "<p>text mentioning javascript:alert(1) is only text</p>",
            "<!-- a comment --><!--[if mso]><table><tr><td>x</td></tr></table><![endif]-->",
        ] {
            assert_eq!(refusal(html), None, "{html}");
        }
        // Without link_domains, any https host.
        assert_eq!(
            html_link_refusal("<a href=https://anywhere.example/>x</a>", &[]),
            None
        );
    }

    #[test]
    fn links_off_the_policy_are_refused_however_written() {
        for (html, expect) in [
            ("<a href=\"javascript:alert(1)\">x</a>", "is not https"),
            (
                "<a href=\"&#106;ava&#x73;cript&colon;alert(1)\">x</a>",
                "is not https",
            ),
            ("<a href=\" java\tscript:alert(1)\">x</a>", "is not https"),
            ("<a HREF=\"http://shop.example/\">x</a>", "is not https"),
            ("<a href=\"data:text/html,hi\">x</a>", "is not https"),
            ("<a href=\"/relative\">x</a>", "is not a URL"),
            ("<a href=\"https://evil.example/\">x</a>", "link_domains"),
            (
                "<a href=\"https://shop.example@evil.example/\">x</a>",
                "credentials",
            ),
            ("<img src=\"https://evil.example/t.png\">", "link_domains"),
            (
                "<form action=https://evil.example/><input></form>",
                "link_domains",
            ),
            (
                "<img srcset=\"https://shop.example/a.png 1x, https://evil.example/b.png 2x\">",
                "link_domains",
            ),
            (
                "<svg><a xlink:href=\"https://shop.example/\">x</a></svg>",
                "<svg>",
            ),
            (
                "<td style=\"background:url(https://evil.example/t.png)\">",
                "link_domains",
            ),
            (
                "<td style=\"background:u\\72 l(https://evil.example/t.png)\">",
                "link_domains",
            ),
            (
                "<td style=\"background:url( 'javascript:x' )\">",
                "is not https",
            ),
            ("<td style=\"width: expression(alert(1))\">", "expression"),
            (
                "<style>@import \"https://evil.example/s.css\";</style>",
                "<style>",
            ),
            (
                "<style>b{background:url(https://evil.example/x)}",
                "link_domains",
            ),
            (
                "<img src=https://shop.example/a.png onerror=\"alert(1)\">",
                "onerror",
            ),
            ("<script>alert(1)</script>", "<script>"),
            ("<iframe srcdoc=\"<script>x</script>\"></iframe>", "srcdoc"),
            (
                "<meta http-equiv=Refresh content=\"0;url=https://evil.example/\">",
                "refresh",
            ),
            (
                "<!--[if mso]><a href=\"https://evil.example/\">x</a><![endif]-->",
                "in a comment",
            ),
            ("<!-- <!-- <img src=javascript:x> -->", "is not https"),
        ] {
            let e = refusal(html).unwrap_or_else(|| panic!("{html} passed"));
            assert!(e.contains(expect), "{html}: {e}");
        }
    }

    #[test]
    fn css_escapes_and_comments_are_undone_before_the_check() {
        assert_eq!(
            unescape_css("u\\72 l(x) \\\"q\\\" \\0"),
            "url(x) \"q\" \u{FFFD}"
        );
        assert_eq!(strip_css_comments("a/* x */b/* open"), "ab");
        assert_eq!(css_argument(" 'a)b' )"), "a)b");
        assert_eq!(
            css_argument("https://x.example/a ) rest"),
            "https://x.example/a"
        );
    }
}
