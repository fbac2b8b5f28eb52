//! Hot reload: watches the plugin and template directories and reloads what changed. The
//! only module that touches `notify`.
//!
//! File events are debounced (a burst of writes, renames and deletes becomes one reload,
//! once the directory has been quiet for [`QUIET`]). Publishing is write-then-rename: write
//! the new file under a hidden or non-`.wasm` name in the same directory, then rename it into
//! place, so a reload never sees half a file; a file written in place is only taken once its
//! size stops changing (`plugin::PluginHost::load_dir`). A broken new plugin or template
//! never replaces a working one.
//!
//! A template is settled before it is swapped in. A half-written plugin fails to compile
//! and is refused, but the first part of a template is often valid Handlebars on its own
//! (`Settled v2` of `Settled v2 {{order_id}}`) and would go live. So, where the kernel says
//! when a writer closes a file (Linux's inotify: `IN_CLOSE_WRITE`), a `.hbs` file written
//! to and not yet closed holds the template reload back, the previous set serving, until
//! its writer closes it (or, for a writer that keeps it open, [`UNSETTLED_MAX`] passes); the
//! reload is counted as `pending` meanwhile. And, as for plugins, templates that changed
//! while they were read are not swapped in (the change's event brings the next reload).
//! Write-then-rename needs none of this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// How long a template file still open for writing may hold the template reload back: a
/// writer that keeps a file open for longer (a log-like tool, a stuck editor) must not stop
/// every other template change from going live.
const UNSETTLED_MAX: Duration = Duration::from_secs(30);

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

/// One file event, as the reload loop needs it.
struct Change {
    dir: Dir,
    path: PathBuf,
    writing: Writing,
}

/// What a file event says about a template file's writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// Written to (or created): unsettled until its writer closes it.
    Started,
    /// Its writer closed it, or it is gone: settled.
    Ended,
    Neither,
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
                for dir in [Dir::Plugins, Dir::Templates] {
                    let _ = sender.send(Change {
                        dir,
                        path: PathBuf::new(),
                        writing: Writing::Neither,
                    });
                }
            }
            Ok(event) if changes_content(&event.kind) => {
                for path in &event.paths {
                    if let Some(dir) = classify(path) {
                        let writing = writing(&event.kind, path);
                        let path = path.clone();
                        let _ = sender.send(Change { dir, path, writing });
                    }
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

/// What the reload loop has seen and not yet acted on.
#[derive(Default)]
struct Pending {
    plugins: bool,
    templates: bool,
    /// Template files written to and not yet closed, with when their writing was first seen.
    writing: HashMap<PathBuf, tokio::time::Instant>,
}

impl Pending {
    fn note(&mut self, change: Change) {
        match change.dir {
            Dir::Plugins => self.plugins = true,
            Dir::Templates => self.templates = true,
        }
        match change.writing {
            Writing::Started => {
                self.writing
                    .entry(change.path)
                    .or_insert_with(tokio::time::Instant::now);
            }
            Writing::Ended => {
                self.writing.remove(&change.path);
            }
            Writing::Neither => {}
        }
    }

    /// When a held-back template reload goes ahead although a file is still open.
    fn give_up_at(&self) -> Option<tokio::time::Instant> {
        let oldest = self.writing.values().min()?;
        self.templates.then_some(*oldest + UNSETTLED_MAX)
    }
}

async fn run(
    // Kept alive for as long as the loop runs: dropping it stops the events.
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<Change>,
    what: Reloadable,
    shutdown: CancellationToken,
) {
    // The watch began after the start-up load: catch up on anything changed in between
    // (unchanged plugins cost one SHA-256 each). Counted like any reload: a change caught
    // here is not seen again by the event it also caused.
    reload_plugins(&what).await;
    reload_templates(&what);
    let mut pending = Pending::default();
    loop {
        // A change; or, with a template reload held back by a file being written, the
        // writer closing it (an event too) or the bound passing.
        let give_up_at = pending.give_up_at();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            change = events.recv() => match change {
                Some(change) => pending.note(change),
                None => return,
            },
            _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(tokio::time::Instant::now)), if give_up_at.is_some() => {
                let files: Vec<_> = pending.writing.drain().map(|(path, _)| path).collect();
                tracing::warn!(files = ?files, "template files still open for writing after {} s; reloading the templates anyway", UNSETTLED_MAX.as_secs());
            }
        }
        // Debounce: wait until nothing has happened for QUIET.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(QUIET) => break,
                change = events.recv() => match change {
                    Some(change) => pending.note(change),
                    None => return,
                },
            }
        }
        if std::mem::take(&mut pending.plugins) {
            reload_plugins(&what).await;
        }
        if pending.templates && pending.writing.is_empty() {
            pending.templates = false;
            reload_templates(&what);
        } else if pending.templates {
            what.metrics
                .template_reloads
                .with_label_values(&["pending"])
                .inc();
            let files: Vec<_> = pending.writing.keys().collect();
            tracing::info!(files = ?files, "template files still being written; the templates reload once they are closed");
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

/// Reloads the templates, unless a template file changed while they were read (as for a
/// plugin file: what was read may be half old, half new); then nothing is swapped, the
/// reload counts as `pending`, and the change's own event brings the next one.
fn reload_templates(what: &Reloadable) {
    let current = what.templates.load();
    let before = template_stamps(&what.templates_dir);
    let reloaded = current.reload();
    if template_stamps(&what.templates_dir) != before {
        what.metrics
            .template_reloads
            .with_label_values(&["pending"])
            .inc();
        tracing::info!(dir = %what.templates_dir.display(), "template files changed while they were read; reloading again");
        return;
    }
    match reloaded {
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
            what.health.set_templates(kept);
            tracing::info!(dir = %what.templates_dir.display(), "email templates reloaded");
        }
        Err(e) => {
            what.metrics
                .template_reloads
                .with_label_values(&["failed"])
                .inc();
            what.health
                .set_templates(vec![format!("reloading the templates failed: {e}")]);
            tracing::error!(error = %e, dir = %what.templates_dir.display(), "reloading the templates failed; the previous ones keep serving");
        }
    }
}

/// Length and modification time of every template file (`<tenant>/<folder>/*.hbs`, what a
/// reload reads), in a stable order.
fn template_stamps(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut stamps: Vec<_> = entries(dir)
        .iter()
        .flat_map(|tenant| entries(tenant))
        .flat_map(|folder| entries(&folder))
        .filter(|file| file.extension().and_then(|e| e.to_str()) == Some("hbs"))
        .filter_map(|file| {
            let meta = std::fs::metadata(&file).ok()?;
            Some((file, meta.len(), meta.modified().ok()))
        })
        .collect();
    stamps.sort();
    stamps
}

/// What `kind` says about the writer of `path`, if it is a template file (`*.hbs`, what a
/// template reload reads) and the platform reports closes (Linux). Elsewhere the debounce
/// alone settles.
fn writing(kind: &notify::EventKind, path: &Path) -> Writing {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
    if !cfg!(target_os = "linux") || path.extension().and_then(|e| e.to_str()) != Some("hbs") {
        return Writing::Neither;
    }
    match kind {
        EventKind::Modify(ModifyKind::Data(_)) => Writing::Started,
        // A file created by opening it (not a link, a directory, or a rename into place).
        EventKind::Create(CreateKind::File)
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) =>
        {
            Writing::Started
        }
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => Writing::Ended,
        _ => Writing::Neither,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn change(path: &str, writing: Writing) -> Change {
        Change {
            dir: Dir::Templates,
            path: PathBuf::from(path),
            writing,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_template_file_open_for_writing_holds_the_reload_back_until_closed_or_too_long() {
        let mut pending = Pending::default();
        pending.note(change("t/a/subject.hbs", Writing::Started));
        pending.note(change("t/a/subject.hbs", Writing::Started));
        pending.note(change("t/a/html.hbs", Writing::Neither));
        assert!(pending.templates);
        assert_eq!(pending.writing.len(), 1);
        let give_up = pending.give_up_at().expect("held back");
        assert_eq!(give_up, tokio::time::Instant::now() + UNSETTLED_MAX);
        pending.note(change("t/a/subject.hbs", Writing::Ended));
        assert!(pending.writing.is_empty());
        assert_eq!(pending.give_up_at(), None);
    }

    #[test]
    fn only_template_files_have_writers_that_count() {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, DataChange, ModifyKind};
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let expect = |w| {
            if cfg!(target_os = "linux") {
                w
            } else {
                Writing::Neither
            }
        };
        assert_eq!(
            writing(&data, Path::new("t/a/subject.hbs")),
            expect(Writing::Started)
        );
        assert_eq!(
            writing(&closed, Path::new("t/a/subject.hbs")),
            expect(Writing::Ended)
        );
        // An editor's swap file stays open for a whole session: not a template.
        assert_eq!(
            writing(&data, Path::new("t/a/.subject.hbs.swp")),
            Writing::Neither
        );
    }
}
