//! A client of the public REST API (the inbox) acting with one token.

use notify_engine::app::Running;
use serde_json::Value;

/// A client of the public REST API acting with one token.
pub struct Api {
    base: String,
    client: reqwest::Client,
    pub token: String,
}

impl Api {
    pub fn new(engine: &Running, token: &str) -> Self {
        Self {
            base: format!("http://{}", engine.http_addr),
            client: reqwest::Client::new(),
            token: token.to_owned(),
        }
    }

    /// `method path` with the token and an optional JSON body: the status and JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, body) = self.call_with_headers(method, path, body).await;
        (status, body)
    }

    /// Like [`Api::call`], with the response's headers.
    pub async fn call_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("API request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call("POST", path, body).await
    }
}

/// The `Retry-After` of a response, in seconds (which must be there, and a number).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds")
}

/// Inbox ids of a list response.
pub fn ids(page: &Value) -> Vec<i64> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_i64().unwrap())
        .collect()
}
