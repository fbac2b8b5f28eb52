//! The operator's side of an engine, as a probe or a scraper sees it: readiness, the status
//! report and the metrics page, all on the admin listener.

use notify_engine::app::Running;
use serde_json::Value;

/// `GET /readyz` on the admin listener: the status and the JSON body.
pub async fn readyz(admin: std::net::SocketAddr) -> (u16, Value) {
    let response = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// `GET /status` on the admin listener (always 200: a report, not a probe): the JSON body.
pub async fn status(admin: std::net::SocketAddr) -> Value {
    let response = reqwest::get(format!("http://{admin}/status"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "/status is a report: always 200");
    response.json().await.unwrap()
}

/// The value of one series on the engine's `/metrics` (`name` with its labels, as printed),
/// if it is there.
pub async fn metric(engine: &Running, series: &str) -> Option<f64> {
    let metrics = reqwest::get(format!("http://{}/metrics", engine.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}
