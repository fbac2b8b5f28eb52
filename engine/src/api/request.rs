//! The one rule for what a public route takes besides its path and credentials: its query
//! string and its JSON body, both parsed by [`Input`], so no route can ignore either.
//!
//! Ignoring them was the trouble: a route that never looked at its query answered
//! `?tenant=x` with 200 (as if the parameter had been honoured), and one that never read its
//! body accepted 17 KiB of anything and acted on it. Every handler of the inbox and the
//! ticket route takes an `Input` last; a route that takes nothing takes `Input` (=
//! `Input<Nothing, Nothing>`), which still refuses what it does not understand.

use axum::extract::{FromRequest, Query, Request};
use axum::http::header;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::MAX_BODY_BYTES;
use super::error::ApiError;

/// A route's query parameters `Q` and JSON body `B`. `400` (`bad_request`) for a query
/// parameter `Q` does not have, a body over 16 KiB, a non-empty body that is not JSON, or a
/// JSON body that is not a `B` (unknown fields included); no body at all reads as `{}`.
pub struct Input<Q = Nothing, B = Nothing> {
    pub query: Q,
    pub body: B,
}

/// No parameters, no body fields: what a route that takes none accepts (nothing, or `{}`,
/// which is what the TypeScript client sends).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nothing {}

impl<Q, B, S> FromRequest<S> for Input<Q, B>
where
    Q: DeserializeOwned + Send,
    B: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let query = Query::<Q>::try_from_uri(req.uri())
            .map_err(|e| ApiError::BadRequest(e.body_text()))?
            .0;
        let too_big = || ApiError::BadRequest(format!("bodies are at most {MAX_BODY_BYTES} bytes"));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_big());
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json);
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| too_big())?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_slice(b"{}")
        } else if !json {
            return Err(ApiError::BadRequest(
                "a body must be JSON (Content-Type: application/json)".into(),
            ));
        } else if bytes.trim_ascii_start().first() != Some(&b'{') {
            // serde would take `[]` for a struct without fields.
            return Err(ApiError::BadRequest("a body must be a JSON object".into()));
        } else {
            serde_json::from_slice(&bytes)
        };
        let body = body.map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
        Ok(Self { query, body })
    }
}

/// `application/json` or a `+json` type, parameters aside (as axum's `Json` takes them).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.rsplit_once('+').is_some_and(|(ty, suffix)| {
            ty.starts_with("application/") && suffix.eq_ignore_ascii_case("json")
        })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Upto {
        up_to: i64,
    }

    async fn input<Q: DeserializeOwned + Send, B: DeserializeOwned>(
        uri: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> Result<Input<Q, B>, String> {
        let mut r = Request::builder().method("POST").uri(uri);
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        let r = r.body(Body::from(body.to_owned())).unwrap();
        Input::<Q, B>::from_request(r, &())
            .await
            .map_err(|e| match e {
                ApiError::BadRequest(m) => m,
                other => panic!("{other:?}"),
            })
    }

    #[tokio::test]
    async fn a_route_that_takes_nothing_refuses_anything_else() {
        let json = Some("application/json");
        for (uri, body) in [("/x", ""), ("/x", "{}"), ("/x", " { } "), ("/x?", "")] {
            assert!(
                input::<Nothing, Nothing>(uri, json, body).await.is_ok(),
                "{uri} {body}"
            );
        }
        assert!(input::<Nothing, Nothing>("/x", None, "").await.is_ok());
        for (uri, ct, body) in [
            ("/x?tenant=x", json, ""),
            ("/x", json, r#"{"tenant": "x"}"#),
            ("/x", json, "[]"),
            ("/x", json, "{"),
            ("/x", None, "{}"),
            ("/x", Some("text/plain"), "{}"),
        ] {
            assert!(
                input::<Nothing, Nothing>(uri, ct, body).await.is_err(),
                "{uri} {body}"
            );
        }
        let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        let err = input::<Nothing, Nothing>("/x", json, &big)
            .await
            .err()
            .unwrap();
        assert!(err.contains("at most 16384 bytes"), "{err}");
    }

    #[tokio::test]
    async fn a_route_with_a_body_gets_it_whole() {
        let ok = input::<Nothing, Upto>(
            "/x",
            Some("application/json; charset=utf-8"),
            r#"{"up_to": 3}"#,
        )
        .await
        .unwrap();
        assert_eq!(ok.body.up_to, 3);
        assert!(
            input::<Nothing, Upto>("/x", Some("application/vnd.api+json"), r#"{"up_to": 3}"#)
                .await
                .is_ok()
        );
        for body in ["", "{}", r#"{"up_to": 3, "x": 1}"#, r#"{"up_to": "3"}"#] {
            assert!(
                input::<Nothing, Upto>("/x", Some("application/json"), body)
                    .await
                    .is_err(),
                "{body}"
            );
        }
    }
}
