//! Plugins for a test: the shared precompiled cache, installing a built plugin into a
//! world's plugin directory, and publishing one under a running engine the documented way.

use std::path::{Path, PathBuf};

use notify_engine::app::Running;

use super::wait::eventually;
use super::world::World;

/// The precompiled-plugin cache every test engine and host shares (`plugins.cache_dir`): a
/// Python or JavaScript component takes seconds to compile, and this way once per run (or
/// once per machine: the cache lives in the cargo target directory).
pub fn plugin_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")
}

impl World {
    /// Installs the chaos fixture as `tenant`'s routing plugin.
    pub fn install_chaos_plugin(&self, tenant: &str) {
        self.install_plugin("fixtures/chaos.wasm", &format!("{tenant}.wasm"));
    }

    /// Copies the built plugin `file` into this world's plugin directory as `name`.
    pub fn install_plugin(&self, file: &str, name: &str) {
        std::fs::copy(
            self.services.plugins.join(file),
            self.plugin_dir.path().join(name),
        )
        .unwrap();
    }
}

/// Publishes `bytes` as `dir/name` the documented way: written under a hidden name in the
/// same directory, then renamed into place.
pub fn publish(dir: &Path, name: &str, bytes: &[u8]) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

/// Publishes the built plugin `file` as `tenant`'s plugin and waits until it is loaded (the
/// first load of the test's engine).
pub async fn install_build(world: &World, engine: &Running, tenant: &str, file: &str) {
    let bytes = std::fs::read(world.services.plugins.join(file)).unwrap();
    publish(world.plugin_dir.path(), &format!("{tenant}.wasm"), &bytes);
    eventually("the new build is loaded", async || {
        engine
            .metrics
            .plugin_reloads
            .with_label_values(&["loaded"])
            .get()
            >= 1
    })
    .await;
}
