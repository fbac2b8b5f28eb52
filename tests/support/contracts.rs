//! The JSON Schemas of `contracts/schemas/`, loaded so tests can hold real Kafka messages
//! and SSE frames against the published contract.

use std::path::Path;

use serde_json::Value;

use super::sse::SseEvent;

/// The JSON Schemas of `contracts/schemas/`, to hold real messages and frames against.
pub struct Contracts {
    schemas: std::collections::HashMap<String, jsonschema::Validator>,
}

impl Contracts {
    pub fn load() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/schemas");
        let mut schemas = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&dir).expect("contracts/schemas") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            let Some(name) = name.strip_suffix(".schema.json") else {
                continue;
            };
            let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", path.display()));
            schemas.insert(name.to_owned(), validator);
        }
        Self { schemas }
    }

    /// Panics, naming every violation, unless `value` is valid against `schema`.
    pub fn check(&self, schema: &str, value: &Value) {
        let validator = self
            .schemas
            .get(schema)
            .unwrap_or_else(|| panic!("no contracts/schemas/{schema}.schema.json"));
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{schema}: {value} violates the contract: {errors:?}"
        );
    }

    /// Holds an SSE frame against the schema of its event name.
    pub fn check_sse(&self, event: &SseEvent) {
        let schema = match event.event.as_str() {
            "notification" => "sse-notification",
            "notification.read" => "sse-notification-read",
            "notification.archived" => "sse-notification-archived",
            "auth.expired" => "sse-auth-expired",
            _ => "sse-live-update",
        };
        assert!(
            event
                .id
                .as_deref()
                .is_some_and(|id| id.parse::<i64>().is_ok()),
            "every frame carries a numeric id: {event:?}"
        );
        self.check(schema, &event.data);
    }
}
