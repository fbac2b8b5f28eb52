//! Hot reload: watches the plugin and template directories and reloads what changed. The
//! only module that touches `notify`.
//!
//! File events are debounced (a burst of writes, renames and deletes becomes one reload,
//! once the directory has been quiet for [`QUIET`]). Publishing is write-then-rename: write
//! the new file under a hidden or non-`.wasm` name in the same directory, then rename it into
//! place, so a reload never sees half a file; a file written in place is only taken once its
//! size stops changing (`plugin::PluginHost::load_dir`). A broken new plugin or template
//! never replaces a working one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::plugin::{PluginHost, ReloadOutcome};
use crate::telemetry::Metrics;
use crate::templates::Templates;

/// How long a directory must be quiet before it is reloaded.
const QUIET: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {error}")]
pub struct WatchError {
    path: PathBuf,
    error: notify::Error,
}

/// What the watcher reloads.
pub struct Reloadable {
    pub plugins: Arc<PluginHost>,
    pub plugin_dir: PathBuf,
    pub templates: Arc<ArcSwap<Templates>>,
    pub templates_dir: PathBuf,
    pub metrics: Metrics,
    /// Readiness shows the plugin set as of the last reload.
    pub health: Arc<Health>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Plugins,
    Templates,
}

/// Starts watching; the returned future reloads on changes until `shutdown`.
pub fn watch(
    what: Reloadable,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, WatchError> {
    let (sender, events) = mpsc::unbounded_channel();
    // Canonical paths: notify reports absolute paths, and the configured ones may be
    // relative or go through symlinks.
    let plugin_dir = canonical(&what.plugin_dir);
    let templates_dir = canonical(&what.templates_dir);
    let classify = {
        let (plugin_dir, templates_dir) = (plugin_dir.clone(), templates_dir.clone());
        move |path: &std::path::Path| {
            if path.starts_with(&templates_dir) {
                Some(Dir::Templates)
            } else if path.starts_with(&plugin_dir) {
                Some(Dir::Plugins)
            } else {
                None
            }
        }
    };
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            // Reading a file is an event too (a reload reads every file): only changes
            // count, or each reload would trigger the next.
            // The kernel's queue overflowed: events were lost, so reload both.
            Ok(event) if event.need_rescan() => {
                let _ = sender.send(Dir::Plugins);
                let _ = sender.send(Dir::Templates);
            }
            Ok(event) if changes_content(&event.kind) => {
                for dir in event.paths.iter().filter_map(|p| classify(p)) {
                    let _ = sender.send(dir);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watcher error"),
        })
        .map_err(|error| WatchError {
            path: plugin_dir.clone(),
            error,
        })?;
    for (path, mode) in [
        (&plugin_dir, RecursiveMode::NonRecursive),
        (&templates_dir, RecursiveMode::Recursive),
    ] {
        watcher.watch(path, mode).map_err(|error| WatchError {
            path: path.clone(),
            error,
        })?;
    }
    Ok(run(watcher, events, what, shutdown))
}

async fn run(
    // Kept alive for as long as the loop runs: dropping it stops the events.
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<Dir>,
    what: Reloadable,
    shutdown: CancellationToken,
) {
    // The watch began after the start-up load: catch up on anything changed in between
    // (unchanged plugins cost one SHA-256 each). Counted like any reload: a change caught
    // here is not seen again by the event it also caused.
    reload_plugins(&what).await;
    reload_templates(&what);
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            dir = events.recv() => match dir {
                Some(dir) => dir,
                None => return,
            },
        };
        let (mut plugins, mut templates) = (first == Dir::Plugins, first == Dir::Templates);
        // Debounce: wait until nothing has happened for QUIET.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(QUIET) => break,
                dir = events.recv() => match dir {
                    Some(Dir::Plugins) => plugins = true,
                    Some(Dir::Templates) => templates = true,
                    None => return,
                },
            }
        }
        if plugins {
            reload_plugins(&what).await;
        }
        if templates {
            reload_templates(&what);
        }
    }
}

async fn reload_plugins(what: &Reloadable) {
    match what.plugins.load_dir().await {
        Ok(report) => {
            for reloaded in report {
                if reloaded.outcome != ReloadOutcome::Unchanged {
                    what.metrics
                        .plugin_reloads
                        .with_label_values(&[reloaded.outcome.label()])
                        .inc();
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "reloading the plugin directory failed"),
    }
    what.health.set_plugins(what.plugins.health());
}

fn reload_templates(what: &Reloadable) {
    let current = what.templates.load();
    match current.reload() {
        Ok((fresh, kept)) => {
            for line in &kept {
                tracing::error!(problem = %line, "template edit rejected");
            }
            let outcome = if kept.is_empty() {
                "loaded"
            } else {
                "rejected"
            };
            what.metrics
                .template_reloads
                .with_label_values(&[outcome])
                .inc();
            what.templates.store(Arc::new(fresh));
            tracing::info!(dir = %what.templates_dir.display(), "email templates reloaded");
        }
        Err(e) => {
            what.metrics
                .template_reloads
                .with_label_values(&["failed"])
                .inc();
            tracing::error!(error = %e, dir = %what.templates_dir.display(), "reloading the templates failed; the previous ones keep serving");
        }
    }
}

/// Does the event change what a reload would read?
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

fn canonical(path: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}
