//! The OpenAPI 3.1 document of the public API, generated from the handlers' annotations and
//! types, served at `/api/v1/openapi.json` and checked in as `contracts/openapi.json` (a
//! test fails when the two disagree; `NOTIFY_UPDATE_CONTRACTS=1 cargo test -p notify-engine
//! --lib openapi` rewrites the file).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{error, inbox, sse, tickets};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "notify-engine",
        version = "1.0.0",
        description = "The public API of notify-engine: a user's inbox, and the stream of their \
notifications. Every route acts for the tenant and user of the caller's token and nobody \
else. Errors share one body: `{\"error\": {\"code\", \"message\"}}`; every 401 has the same \
message. The stream's events are specified in contracts/asyncapi.json.",
        license(name = "Apache-2.0"),
    ),
    paths(
        inbox::list,
        inbox::unread_count,
        inbox::get_one,
        inbox::read,
        inbox::read_all,
        inbox::archive,
        inbox::unarchive,
        tickets::create,
        sse::stream,
    ),
    // Schemas reached only through parameters are not collected on their own.
    components(schemas(error::ErrorBody, error::ErrorDetail, inbox::ArchivedFilter)),
    modifiers(&Security),
    tags(
        (name = "inbox", description = "List, count, read and archive the caller's inbox items"),
        (name = "stream", description = "The Server-Sent Events stream and its tickets"),
    ),
)]
pub struct ApiDoc;

/// The three ways to present credentials.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT with claims sub (user), tenant, iss, aud, exp; the key is chosen by kid",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "notify_token",
                "The same JWT in an HttpOnly cookie (auth.cookie_name)",
            ))),
        );
        components.add_security_scheme(
            "ticket",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                tickets::TICKET_PARAM,
                "A single-use ticket from POST /api/v1/sse/tickets; only GET /api/v1/sse accepts it",
            ))),
        );
    }
}

/// The document as checked in: pretty JSON with a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_openapi_document_matches_the_code() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/openapi.json");
        let generated = document();
        if std::env::var_os("NOTIFY_UPDATE_CONTRACTS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "contracts/openapi.json differs from the code; run \
             `NOTIFY_UPDATE_CONTRACTS=1 cargo test -p notify-engine --lib openapi` and review the diff"
        );
        let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }

    /// Every `$ref` points at something in the document (generators refuse it otherwise).
    #[test]
    fn every_reference_in_the_openapi_document_resolves() {
        fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                        out.push(r);
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').expect("local references only");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }
}
