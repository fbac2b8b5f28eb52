//! An example templating plugin: emails in the recipient's language, with money and dates
//! formatted for their locale and time zone, laid out by the tenant's Handlebars files.
//!
//! For each email it:
//!
//! 1. resolves the locale (`recipient.locale`, else the tenant's `default_locale` config,
//!    else `en-US`) to one of the formats below, by exact tag, then by language;
//! 2. resolves the time zone (`recipient.time_zone`, else `default_time_zone`, else `UTC`;
//!    an unknown zone name is invalid data);
//! 3. adds to the template data: `amount_display` (when the data has `amount` and
//!    `currency`), `event_time_display` (the event's time in the recipient's zone),
//!    `locale`, `lang` and `time_zone`;
//! 4. renders `<template>.<lang>/{subject,html,text}` from the tenant's files when that
//!    folder exists (e.g. `order_paid.de`), else `<template>/…`.
//!
//! | locale  | money          | date and time                     |
//! |---------|----------------|-----------------------------------|
//! | `en-US` | `€1,234.50`    | `November 27, 2026, 2:05 PM EST`  |
//! | `en-GB` | `€1,234.50`    | `27 November 2026, 14:05 GMT`     |
//! | `de-DE` | `1.234,50 €`   | `27. November 2026, 14:05 CET`    |
//! | `de-AT` | `€ 1.234,50`   | `27. November 2026, 14:05 CET`    |
//! | `fr-FR` | `1 234,50 €`   | `27 novembre 2026 à 14:05 CET`    |
//!
//! (Other `en-*`, `de-*` and `fr-*` tags take their language's first row; anything else
//! `en-US`. The zone abbreviation is the tz database's.)

use chrono::{DateTime, Datelike, Timelike};
use chrono_tz::Tz;
use notify_plugin_sdk::{
    Data, RenderError, RenderRequest, Rendered, Templater, Value, config, debug, json, templates,
};

struct LocaleTemplater;

impl Templater for LocaleTemplater {
    fn render(request: RenderRequest) -> Result<Rendered, RenderError> {
        let defaults = Defaults {
            locale: config("default_locale"),
            time_zone: config("default_time_zone"),
        };
        render_email(&request, &defaults)
    }
}

notify_plugin_sdk::export_templater!(LocaleTemplater);

/// The tenant's fallbacks for recipients the routing plugin knew nothing about.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub locale: Option<String>,
    pub time_zone: Option<String>,
}

/// The rendering, free of host calls other than `templates.render` and logging (so it runs
/// in native tests with `testing::set_templates`).
pub fn render_email(request: &RenderRequest, defaults: &Defaults) -> Result<Rendered, RenderError> {
    let data = Data::from_json(&request.data)?;
    let tag = request
        .recipient
        .locale
        .clone()
        .or_else(|| defaults.locale.clone())
        .unwrap_or_else(|| "en-US".into());
    let format = Format::for_tag(&tag);
    let zone_name = request
        .recipient
        .time_zone
        .clone()
        .or_else(|| defaults.time_zone.clone())
        .unwrap_or_else(|| "UTC".into());
    let zone: Tz = zone_name
        .parse()
        .map_err(|_| RenderError::invalid_data(format!("unknown time zone {zone_name:?}")))?;
    let time = DateTime::parse_from_rfc3339(&request.event.time).map_err(|e| {
        RenderError::invalid_data(format!("event time {:?}: {e}", request.event.time))
    })?;

    let mut model = data.to_value();
    if let (Some(amount), Some(currency)) = (data.opt_f64("amount")?, data.opt_str("currency")?) {
        model["amount_display"] = json!(format.money(amount, currency));
    }
    model["event_time_display"] = json!(format.date_time(&time.with_timezone(&zone)));
    model["locale"] = json!(format.tag);
    model["lang"] = json!(format.lang);
    model["time_zone"] = json!(zone.name());
    debug!(
        "rendering {} for locale {} ({} asked), zone {}",
        request.template,
        format.tag,
        tag,
        zone.name()
    );

    let localized = format!("{}.{}", request.template, format.lang);
    let part = |part: &str| -> Result<Option<String>, RenderError> {
        if let Some(text) = templates::render_optional(&format!("{localized}/{part}"), &model)? {
            return Ok(Some(text));
        }
        Ok(templates::render_optional(
            &format!("{}/{part}", request.template),
            &model,
        )?)
    };
    let subject = part("subject")?.ok_or_else(|| {
        RenderError::other(format!("template {} has no subject", request.template))
    })?;
    Ok(Rendered {
        // One line: line breaks and runs of ASCII blanks fold to a space (a no-break space
        // inside a price stays).
        subject: subject
            .split(|c: char| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        html: part("html")?,
        text: part("text")?,
    })
}

/// How one locale writes money and dates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Format {
    pub tag: &'static str,
    pub lang: &'static str,
    decimal: char,
    group: &'static str,
    /// Currency symbol before the amount, and the separator between them.
    symbol_first: bool,
    symbol_space: &'static str,
    months: [&'static str; 12],
    date_time: DateStyle,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum DateStyle {
    /// `November 27, 2026, 2:05 PM EST`
    Us,
    /// `27 November 2026, 14:05 GMT`
    Gb,
    /// `27. November 2026, 14:05 CET`
    De,
    /// `27 novembre 2026 à 14:05 CET`
    Fr,
}

const EN_MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DE_MONTHS: [&str; 12] = [
    "Januar",
    "Februar",
    "März",
    "April",
    "Mai",
    "Juni",
    "Juli",
    "August",
    "September",
    "Oktober",
    "November",
    "Dezember",
];
const FR_MONTHS: [&str; 12] = [
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
];

const NBSP: &str = "\u{a0}";
const NARROW_NBSP: &str = "\u{202f}";

const FORMATS: [Format; 5] = [
    Format {
        tag: "en-US",
        lang: "en",
        decimal: '.',
        group: ",",
        symbol_first: true,
        symbol_space: "",
        months: EN_MONTHS,
        date_time: DateStyle::Us,
    },
    Format {
        tag: "en-GB",
        lang: "en",
        decimal: '.',
        group: ",",
        symbol_first: true,
        symbol_space: "",
        months: EN_MONTHS,
        date_time: DateStyle::Gb,
    },
    Format {
        tag: "de-DE",
        lang: "de",
        decimal: ',',
        group: ".",
        symbol_first: false,
        symbol_space: NBSP,
        months: DE_MONTHS,
        date_time: DateStyle::De,
    },
    Format {
        tag: "de-AT",
        lang: "de",
        decimal: ',',
        group: ".",
        symbol_first: true,
        symbol_space: NBSP,
        months: DE_MONTHS,
        date_time: DateStyle::De,
    },
    Format {
        tag: "fr-FR",
        lang: "fr",
        decimal: ',',
        group: NARROW_NBSP,
        symbol_first: false,
        symbol_space: NBSP,
        months: FR_MONTHS,
        date_time: DateStyle::Fr,
    },
];

impl Format {
    /// The format for a BCP 47 tag: exact (case-insensitive, `_` taken as `-`), else the
    /// first of its language, else `en-US`.
    pub fn for_tag(tag: &str) -> Format {
        let tag = tag.replace('_', "-");
        let lang = tag.split('-').next().unwrap_or_default();
        FORMATS
            .iter()
            .find(|f| f.tag.eq_ignore_ascii_case(&tag))
            .or_else(|| FORMATS.iter().find(|f| f.lang.eq_ignore_ascii_case(lang)))
            .copied()
            .unwrap_or(FORMATS[0])
    }

    /// `amount` in `currency` (ISO 4217), with the currency's minor units.
    pub fn money(&self, amount: f64, currency: &str) -> String {
        let decimals = match currency {
            "JPY" | "KRW" | "ISK" | "CLP" | "VND" | "UGX" | "PYG" | "XAF" | "XOF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            _ => 2,
        };
        let fixed = format!("{:.decimals$}", amount.abs());
        let (whole, fraction) = fixed.split_once('.').unwrap_or((&fixed, ""));
        let mut grouped = String::new();
        for (i, digit) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push_str(self.group);
            }
            grouped.push(digit);
        }
        if !fraction.is_empty() {
            grouped.push(self.decimal);
            grouped.push_str(fraction);
        }
        let symbol = match currency {
            "EUR" => "€",
            "USD" => "$",
            "GBP" => "£",
            "JPY" => "¥",
            other => other,
        };
        // A code (not a symbol) always stands apart from the number.
        let space = if symbol.len() == 3 && symbol.is_ascii() {
            NBSP
        } else {
            self.symbol_space
        };
        let sign = if amount < 0.0 { "-" } else { "" };
        if self.symbol_first {
            format!("{sign}{symbol}{space}{grouped}")
        } else {
            format!("{sign}{grouped}{space}{symbol}")
        }
    }

    /// A date and time in this locale's style, with the zone's abbreviation.
    pub fn date_time(&self, t: &DateTime<Tz>) -> String {
        let month = self.months[t.month0() as usize];
        let zone = t.format("%Z");
        let (day, year, hour, minute) = (t.day(), t.year(), t.hour(), t.minute());
        match self.date_time {
            DateStyle::Us => {
                let (pm, hour12) = t.hour12();
                let half = if pm { "PM" } else { "AM" };
                format!("{month} {day}, {year}, {hour12}:{minute:02} {half} {zone}")
            }
            DateStyle::Gb => format!("{day} {month} {year}, {hour:02}:{minute:02} {zone}"),
            DateStyle::De => format!("{day}. {month} {year}, {hour:02}:{minute:02} {zone}"),
            DateStyle::Fr => format!("{day} {month} {year} à {hour:02}:{minute:02} {zone}"),
        }
    }
}

/// The data value as a string, for templates' sake (used by tests).
#[doc(hidden)]
pub fn display(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_plugin_sdk::{TemplateError, testing};

    fn at(rfc3339: &str, zone: &str) -> DateTime<Tz> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&zone.parse::<Tz>().unwrap())
    }

    #[test]
    fn money_per_locale() {
        let cases = [
            ("en-US", 1234.5, "EUR", "€1,234.50"),
            ("en-US", 129.9, "USD", "$129.90"),
            ("en-GB", 1_234_567.0, "GBP", "£1,234,567.00"),
            ("de-DE", 1234.5, "EUR", "1.234,50\u{a0}€"),
            ("de-DE", 129.9, "EUR", "129,90\u{a0}€"),
            ("de-AT", 1234.5, "EUR", "€\u{a0}1.234,50"),
            ("fr-FR", 1234.5, "EUR", "1\u{202f}234,50\u{a0}€"),
            ("de-DE", 1500.0, "JPY", "1.500\u{a0}¥"),
            ("en-US", 12.5, "CHF", "CHF\u{a0}12.50"),
            ("en-US", -3.0, "USD", "-$3.00"),
        ];
        for (tag, amount, currency, expected) in cases {
            assert_eq!(
                Format::for_tag(tag).money(amount, currency),
                expected,
                "{tag} {amount} {currency}"
            );
        }
    }

    #[test]
    fn dates_in_the_recipients_zone() {
        let t = "2026-11-27T13:05:00Z";
        assert_eq!(
            Format::for_tag("en-US").date_time(&at(t, "America/New_York")),
            "November 27, 2026, 8:05 AM EST"
        );
        assert_eq!(
            Format::for_tag("de-DE").date_time(&at(t, "Europe/Berlin")),
            "27. November 2026, 14:05 CET"
        );
        assert_eq!(
            Format::for_tag("en-GB").date_time(&at(t, "Europe/London")),
            "27 November 2026, 13:05 GMT"
        );
        assert_eq!(
            Format::for_tag("fr-FR").date_time(&at("2026-07-01T22:30:00Z", "Europe/Paris")),
            "2 juillet 2026 à 00:30 CEST"
        );
    }

    #[test]
    fn tags_resolve_by_tag_then_language() {
        assert_eq!(Format::for_tag("de_de").tag, "de-DE");
        assert_eq!(Format::for_tag("de-CH").tag, "de-DE");
        assert_eq!(Format::for_tag("en-AU").tag, "en-US");
        assert_eq!(Format::for_tag("ja-JP").tag, "en-US");
    }

    /// Templates for tests: `order_paid.de` in German, `order_paid` in English, echoing
    /// the fields the plugin adds.
    fn templates() {
        testing::set_templates(|name, data| {
            let field = |k: &str| display(&data[k]);
            match name {
                "order_paid.de/subject" => Ok(format!("Zahlung über {}", field("amount_display"))),
                "order_paid.de/text" => Ok(format!("Bezahlt am {}", field("event_time_display"))),
                "order_paid/subject" => Ok(format!("Payment of {}", field("amount_display"))),
                "order_paid/text" => Ok(format!("Paid on {}", field("event_time_display"))),
                "order_paid/html" => Ok(format!("<p lang=\"{}\">html</p>", field("lang"))),
                _ => Err(TemplateError::Missing),
            }
        });
    }

    fn request(locale: Option<&str>, zone: Option<&str>) -> RenderRequest {
        let mut r = testing::render_request(
            "order_paid",
            json!({"order_id": "A-1", "amount": 1234.5, "currency": "EUR"}),
        );
        r.recipient.locale = locale.map(Into::into);
        r.recipient.time_zone = zone.map(Into::into);
        r
    }

    #[test]
    fn german_recipient_gets_the_german_files_with_german_formats() {
        templates();
        let out = render_email(
            &request(Some("de-DE"), Some("Europe/Berlin")),
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(out.subject, "Zahlung über 1.234,50\u{a0}€");
        assert_eq!(
            out.text.as_deref(),
            Some("Bezahlt am 27. November 2026, 14:05 CET")
        );
        // No German html: the shared layout, told the language.
        assert_eq!(out.html.as_deref(), Some("<p lang=\"de\">html</p>"));
        testing::reset();
    }

    #[test]
    fn us_recipient_and_tenant_defaults() {
        templates();
        let out = render_email(
            &request(Some("en-US"), Some("America/New_York")),
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(out.subject, "Payment of €1,234.50");
        assert_eq!(
            out.text.as_deref(),
            Some("Paid on November 27, 2026, 8:05 AM EST")
        );
        let defaults = Defaults {
            locale: Some("de-AT".into()),
            time_zone: Some("Europe/Vienna".into()),
        };
        let out = render_email(&request(None, None), &defaults).unwrap();
        assert_eq!(out.subject, "Zahlung über €\u{a0}1.234,50");
        testing::reset();
    }

    #[test]
    fn bad_zone_and_missing_templates_are_errors() {
        templates();
        assert_eq!(
            render_email(&request(None, Some("Mars/Olympus")), &Defaults::default()),
            Err(RenderError::InvalidData(
                "unknown time zone \"Mars/Olympus\"".into()
            ))
        );
        let mut r = request(None, None);
        r.template = "nothing".into();
        assert!(matches!(
            render_email(&r, &Defaults::default()),
            Err(RenderError::Other(m)) if m.contains("no subject")
        ));
        testing::set_templates(|_, _| {
            Err(TemplateError::Failed("order_paid/subject:1:4 boom".into()))
        });
        assert!(matches!(
            render_email(&request(None, None), &Defaults::default()),
            Err(RenderError::Other(m)) if m.contains("boom")
        ));
        testing::reset();
    }
}
