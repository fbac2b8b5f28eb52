//! Compiling a plugin file and checking it: through the precompiled cache
//! (`plugins.cache_dir`, read only when `cache` trusts it), then what it imports (only the granted interfaces) and which world
//! and WIT version it implements (the newest it fits, `wit::Pre::new`). `notify-engine
//! plugin check` runs the same checks without loading anything.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::{Loaded, cache};
use crate::plugin::sandbox::CallState;
use crate::plugin::wit::{self, World};
use crate::plugin::{LoadError, WIT_VERSIONS};

/// A plugin file as the host sees it (`notify-engine plugin check`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub world: String,
    pub wit_version: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub size_bytes: usize,
    pub sha256: String,
    pub compile_ms: u64,
}

/// Interface packages a plugin may import. The host links more of WASI than this (the
/// linker is shared), but a component that imports sockets, the filesystem, HTTP or anything
/// unknown is refused at load, naming the import, instead of failing later.
const GRANTED_IMPORTS: &[&str] = &[
    "notify:plugin/",
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
];

fn is_granted(import: &str) -> bool {
    GRANTED_IMPORTS.iter().any(|p| import.starts_with(p))
}

/// Writes a compiled component to the cache (write then rename, so a reader never sees half
/// a file). A failure only costs the next start a compilation.
fn store_in_cache(component: &Component, file: &Path) {
    let write = || -> Result<(), String> {
        let bytes = component.serialize().map_err(|e| e.to_string())?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let temporary = file.with_extension(format!("tmp.{}", std::process::id()));
        // Readable and writable by the engine's user alone, as `cache` expects to find it.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut out, &bytes).map_err(|e| e.to_string())?;
        drop(out);
        std::fs::rename(&temporary, file).map_err(|e| e.to_string())
    };
    if let Err(e) = write() {
        tracing::warn!(file = %file.display(), error = %e, "could not write the precompiled plugin cache");
    }
}

/// A plugin file's bytes and their SHA-256 (the tools, which read one file once).
pub(in crate::plugin) async fn read_plugin(path: &Path) -> Result<(Vec<u8>, String), LoadError> {
    let bytes = tokio::fs::read(path).await.map_err(|e| LoadError {
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })?;
    let digest = hex(&Sha256::digest(&bytes));
    Ok((bytes, digest))
}

/// What compiles and links plugins: the host's engine and linker, and the cache directory
/// (empty: no cache).
pub(in crate::plugin) struct Compiler<'a> {
    pub(in crate::plugin) engine: &'a Engine,
    pub(in crate::plugin) linker: &'a Linker<CallState>,
    pub(in crate::plugin) cache_dir: &'a Path,
}

impl Compiler<'_> {
    /// Compiles a component off the async threads (the blocking pool), or takes it from the
    /// precompiled cache (`plugins.cache_dir`) when this engine compiled the same bytes
    /// before, so a restart skips compilation.
    async fn compile_component(&self, path: &Path, bytes: Vec<u8>) -> Result<Component, LoadError> {
        let err = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
        let cached = self.cache_file(&bytes);
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            // A cache others could have written into is neither read nor written (see
            // `cache`): checked again at each load, as it may have changed since start-up.
            let cached = cached.filter(|file| match file.parent().map(cache::check_dir) {
                Some(Err(why)) => {
                    tracing::warn!(error = %why, "precompiled plugin cache not trusted; compiling without it");
                    false
                }
                _ => true,
            });
            if let Some(file) = &cached {
                // Read into memory rather than mapped: a cache file truncated under a mapping
                // would kill the process with SIGBUS.
                match cache::read_trusted(file) {
                    Ok(None) => {}
                    // SAFETY: deserializing runs native code compiled earlier. The cache holds
                    // only what this engine serialized under its compatibility hash (part of
                    // the file name, and checked again by wasmtime): the directory and the
                    // file were just checked to be writable by the engine's user alone.
                    Ok(Some(b)) => match unsafe { Component::deserialize(&engine, &b) } {
                        Ok(component) => return Ok(component),
                        Err(e) => tracing::warn!(file = %file.display(), error = %e, "precompiled plugin unusable; compiling again"),
                    },
                    Err(why) => tracing::warn!(file = %file.display(), error = %why, "precompiled plugin not trusted; compiling again"),
                }
            }
            let component = Component::new(&engine, &bytes)?;
            if let Some(file) = &cached {
                store_in_cache(&component, file);
            }
            Ok(component)
        })
        .await
        .map_err(|e| err(format!("compiler task failed: {e}")))?
        .map_err(|e: wasmtime::Error| err(format!("not a valid WebAssembly component: {e:#}")))
    }

    /// `<cache_dir>/<sha256 of the bytes>-<engine compatibility hash>.cwasm`, if a cache is
    /// configured: a cache written by another wasmtime version or configuration has another
    /// name and is never read.
    fn cache_file(&self, bytes: &[u8]) -> Option<std::path::PathBuf> {
        if self.cache_dir.as_os_str().is_empty() {
            return None;
        }
        use std::hash::{Hash, Hasher};
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut compat);
        Some(self.cache_dir.join(format!(
            "{}-{:016x}.cwasm",
            hex(&Sha256::digest(bytes)),
            compat.finish()
        )))
    }

    /// Compiles one component off the async threads and checks what it imports and that it
    /// implements the world.
    pub(in crate::plugin) async fn compile(
        &self,
        path: &Path,
        name: &str,
        bytes: Vec<u8>,
        digest: String,
    ) -> Result<Loaded, LoadError> {
        let component = self.compile_component(path, bytes).await?;
        self.link(path, name, &component, digest)
    }

    /// Checks what a compiled component imports and that it implements the world, and links
    /// it, ready to instantiate.
    fn link(
        &self,
        path: &Path,
        name: &str,
        component: &Component,
        digest: String,
    ) -> Result<Loaded, LoadError> {
        let err = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
        if let Some(import) = component
            .component_type()
            .imports(self.engine)
            .map(|(name, _)| name)
            .find(|name| !is_granted(name))
        {
            return Err(err(format!(
                "imports {import}, which plugins are not granted (allowed: {})",
                GRANTED_IMPORTS.join(", ")
            )));
        }
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| err(format!("imports something the host does not offer: {e:#}")))?;
        let Some(pre) = wit::Pre::new(&pre) else {
            let mut exports: Vec<String> = component
                .component_type()
                .exports(self.engine)
                .map(|(name, _)| name.to_owned())
                .collect();
            exports.sort();
            return Err(err(format!(
                "implements no plugin world: it must export notify:plugin/router (routing, WIT {}) or notify:plugin/templater (templating, WIT {}) with the signatures of the WIT; it exports [{}]",
                WIT_VERSIONS.join(" or "),
                World::Templating.versions().join(" or "),
                exports.join(", ")
            )));
        };
        Ok(Loaded {
            name: name.to_owned(),
            digest,
            pre,
            loaded_at: chrono::Utc::now(),
        })
    }

    /// What `notify-engine plugin check` reports: the checks a reload makes, without loading
    /// anything. `Err` carries the reason the host would refuse the file.
    pub(in crate::plugin) async fn check(&self, path: &Path) -> Result<CheckReport, LoadError> {
        let (bytes, sha256) = read_plugin(path).await?;
        let size_bytes = bytes.len();
        let started = Instant::now();
        let component = self.compile_component(path, bytes).await?;
        let compile_ms = started.elapsed().as_millis() as u64;
        let names = |items: Vec<String>| {
            let mut items = items;
            items.sort();
            items
        };
        let imports = names(
            component
                .component_type()
                .imports(self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
        );
        let exports = names(
            component
                .component_type()
                .exports(self.engine)
                .map(|(name, _)| name.to_owned())
                .collect(),
        );
        let linked = self.link(path, "check", &component, sha256.clone())?;
        Ok(CheckReport {
            world: format!("notify:plugin/{}", linked.pre.world().as_str()),
            wit_version: linked.pre.wit_version().into(),
            imports,
            exports,
            size_bytes,
            sha256,
            compile_ms,
        })
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
