//! Where the real services are (Kafka, PostgreSQL, Mailpit, the built plugins and the
//! templates), read from the environment `scripts/services.sh` writes and `scripts/test.sh`
//! loads, and the random suffix that keeps parallel tests apart.
//!
//! The tests never skip: without the services they fail, saying how to start them.

use std::path::{Path, PathBuf};

/// Where the services are, from the environment `scripts/test.sh` sets up.
#[derive(Clone, Debug)]
pub struct Services {
    pub brokers: String,
    pub database_url: String,
    pub mailpit: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub plugins: PathBuf,
    pub templates: PathBuf,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the integration tests need Kafka, PostgreSQL and Mailpit. \
             Run them through `scripts/test.sh`, which starts the services and builds the plugins."
        )
    })
}

impl Services {
    /// A fresh plugin directory holding built plugins: `(built file, name in the directory)`.
    pub fn plugin_dir(&self, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (from, to) in files {
            std::fs::copy(self.plugins.join(from), dir.path().join(to)).unwrap();
        }
        dir
    }

    pub fn get() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let plugins = std::env::var("NOTIFY_TEST_PLUGINS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("plugins/dist"));
        for file in [
            "default.wasm",
            "acme.wasm",
            "locale-templater.wasm",
            "fixtures/chaos.wasm",
            "fixtures/chaos-templater.wasm",
            "guests/python-router.wasm",
            "guests/js-router.wasm",
            "fixtures/chaos-python.wasm",
            "fixtures/chaos-js.wasm",
            "starters/starter-router.wasm",
            "starters/starter-templater.wasm",
        ] {
            assert!(
                plugins.join(file).exists(),
                "{} is missing: build the plugins with scripts/build-plugins.sh",
                plugins.join(file).display()
            );
        }
        Self {
            brokers: required("NOTIFY_KAFKA__BROKERS"),
            database_url: required("DATABASE_URL"),
            mailpit: required("MAILPIT_URL"),
            smtp_host: required("NOTIFY_SMTP__HOST"),
            smtp_port: required("NOTIFY_SMTP__PORT")
                .parse()
                .expect("NOTIFY_SMTP__PORT is a port"),
            plugins,
            templates: root.join("templates"),
        }
    }
}

/// A short random suffix, so parallel tests never share tenants, topics or databases.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}
