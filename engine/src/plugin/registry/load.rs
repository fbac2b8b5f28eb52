//! The diffing reload of the plugin directory. Every `*.wasm` file (not hidden) is a plugin
//! named by its stem; unchanged files (same SHA-256) keep their compiled version; new and
//! changed ones are compiled, checked and swapped in at once. What a file's change does to
//! its slot is decided by pure rules ([`settle`], [`removed`], [`note_rejections`]) so that
//! "a broken new version never replaces a working one" is a unit test.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Compiler, Loaded, Registry, Slot, Slots, hex};
use crate::plugin::LoadError;

/// What a reload did with one plugin file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub name: String,
    pub outcome: ReloadOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// New or changed, compiled and swapped in.
    Loaded,
    /// Same bytes as the version serving.
    Unchanged,
    /// Changed but failed: the previous version keeps serving.
    Rejected(String),
    /// New and failed: nothing serves under this name.
    Broken(String),
    /// The file is still being written: left for the next reload.
    Pending(String),
    /// The file is gone, and so is the plugin.
    Removed,
}

impl ReloadOutcome {
    /// Stable label for the `notify_plugin_reloads_total{outcome}` metric.
    pub fn label(&self) -> &'static str {
        match self {
            ReloadOutcome::Loaded => "loaded",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected(_) => "rejected",
            ReloadOutcome::Broken(_) => "broken",
            ReloadOutcome::Pending(_) => "pending",
            ReloadOutcome::Removed => "removed",
        }
    }
}

/// What reading and compiling one file came to, before the slot is decided.
pub(super) enum Change<T> {
    /// Same bytes as the version serving.
    Unchanged,
    Loaded(T),
    Failed(String),
    /// Still being written.
    Pending(String),
}

impl Registry {
    /// Brings the loaded set in line with the plugin directory (see the module). A changed
    /// file that fails keeps the previous version serving and is reported as rejected; a
    /// new file that fails is remembered as broken; a file still being written (its size
    /// changed while it was read) is left for the next reload; a deleted file's plugin is
    /// dropped. Calls in flight finish on the version they started with. `retire` drops
    /// what the host keeps of versions no longer serving, just before the swap. One reload
    /// runs at a time.
    pub(in crate::plugin) async fn load_dir(
        &self,
        compiler: &Compiler<'_>,
        retire: impl FnOnce(&Slots),
    ) -> Result<Vec<Reloaded>, LoadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| LoadError {
            path: self.dir.clone(),
            message: format!("cannot read the plugin directory: {e}"),
        })?;
        let current = self.slots.load_full();
        let mut next = Slots::new();
        let mut report = Vec::new();
        for path in entries.flatten().map(|entry| entry.path()) {
            let Some(name) = plugin_name(&path) else {
                continue;
            };
            let serving = match current.get(&name) {
                Some(Slot::Ready(loaded)) => Some(loaded),
                _ => None,
            };
            let change = read_change(compiler, &path, &name, serving).await;
            let (slot, outcome) = settle(current.get(&name), change);
            log_outcome(&name, serving.is_some(), slot.as_ref(), &outcome);
            if let Some(slot) = slot {
                next.insert(name.clone(), slot);
            }
            report.push(Reloaded { name, outcome });
        }
        for name in removed(&current, &next) {
            tracing::info!(plugin = %name, "plugin removed");
            report.push(Reloaded {
                name,
                outcome: ReloadOutcome::Removed,
            });
        }
        self.install(next, &report, retire);
        Ok(report)
    }

    /// The swap point: remembers refused candidates, forgets what no longer serves (the
    /// statistics here, the host's through `retire`), then publishes the new set.
    fn install(&self, next: Slots, report: &[Reloaded], retire: impl FnOnce(&Slots)) {
        if !next.contains_key(&self.default_plugin) {
            tracing::warn!(
                dir = %self.dir.display(),
                default = %self.default_plugin,
                "no default routing plugin: tenants without their own plugin wait until it is in place"
            );
        }
        // Held until the swap, so the listing sees refusals and slots of one reload.
        let mut rejected = self.rejected.lock().expect("rejected lock poisoned");
        note_rejections(&mut rejected, report);
        self.stats.retain(
            |name, digest| matches!(next.get(name), Some(Slot::Ready(l)) if l.digest == digest),
        );
        retire(&next);
        self.slots.store(Arc::new(next));
    }

    /// Serves `loaded` alone, under the default name (the local runner).
    pub(in crate::plugin) fn serve_only(&self, loaded: Loaded) {
        let mut slots = Slots::new();
        slots.insert(self.default_plugin.clone(), Slot::Ready(Arc::new(loaded)));
        self.slots.store(Arc::new(slots));
    }
}

/// Reads one plugin file and compiles it unless it is what `serving` was built from.
async fn read_change(
    compiler: &Compiler<'_>,
    path: &Path,
    name: &str,
    serving: Option<&Arc<Loaded>>,
) -> Change<Arc<Loaded>> {
    match read_settled(path).await {
        Err(Unsettled::Growing(e)) => Change::Pending(e),
        Err(Unsettled::Unreadable(e)) => Change::Failed(e),
        Ok(bytes) => {
            let digest = hex(&Sha256::digest(&bytes));
            if serving.is_some_and(|old| old.digest == digest) {
                return Change::Unchanged;
            }
            match compiler.compile(path, name, bytes, digest).await {
                Ok(loaded) => Change::Loaded(Arc::new(loaded)),
                Err(e) => Change::Failed(e.message),
            }
        }
    }
}

/// The slot a file's change leaves under its name (`None`: no slot), and what the reload
/// reports. `current` is the slot before the reload. A failure never replaces a ready
/// version: it keeps serving and the failure is reported as rejected; only a name with
/// nothing ready becomes broken. A file still being written leaves the slot as it was.
pub(super) fn settle<T: Clone>(
    current: Option<&Slot<T>>,
    change: Change<T>,
) -> (Option<Slot<T>>, ReloadOutcome) {
    let serving = match current {
        Some(Slot::Ready(loaded)) => Some(loaded),
        _ => None,
    };
    match change {
        Change::Unchanged => (serving.cloned().map(Slot::Ready), ReloadOutcome::Unchanged),
        Change::Loaded(loaded) => (Some(Slot::Ready(loaded)), ReloadOutcome::Loaded),
        Change::Failed(reason) => match serving {
            Some(old) => (
                Some(Slot::Ready(old.clone())),
                ReloadOutcome::Rejected(reason),
            ),
            None => (
                Some(Slot::Broken(reason.clone())),
                ReloadOutcome::Broken(reason),
            ),
        },
        Change::Pending(reason) => (current.cloned(), ReloadOutcome::Pending(reason)),
    }
}

/// Names loaded before the reload whose file is gone.
pub(super) fn removed<T>(current: &Slots<T>, next: &Slots<T>) -> Vec<String> {
    current
        .keys()
        .filter(|name| !next.contains_key(*name))
        .cloned()
        .collect()
}

/// Keeps `rejected` (refused candidates while an older version serves) in line with a
/// reload's report.
pub(super) fn note_rejections(rejected: &mut BTreeMap<String, String>, report: &[Reloaded]) {
    for r in report {
        match &r.outcome {
            ReloadOutcome::Rejected(reason) => {
                rejected.insert(r.name.clone(), reason.clone());
            }
            // Unchanged too: a reverted file serves what it always did.
            ReloadOutcome::Loaded
            | ReloadOutcome::Unchanged
            | ReloadOutcome::Removed
            | ReloadOutcome::Broken(_) => {
                rejected.remove(&r.name);
            }
            ReloadOutcome::Pending(_) => {}
        }
    }
}

/// The reload's log line for one file; `replaced`: a version was serving before.
fn log_outcome(name: &str, replaced: bool, slot: Option<&Slot>, outcome: &ReloadOutcome) {
    match (outcome, slot) {
        (ReloadOutcome::Loaded, Some(Slot::Ready(loaded))) => {
            tracing::info!(plugin = %name, world = loaded.pre.world().as_str(), wit = loaded.pre.wit_version(), digest = %&loaded.digest[..12], replaced, "plugin loaded");
        }
        (ReloadOutcome::Rejected(reason), Some(Slot::Ready(old))) => {
            tracing::error!(plugin = %name, error = %reason, serving = %&old.digest[..12], "new version of plugin rejected; the previous version keeps serving");
        }
        (ReloadOutcome::Broken(reason), _) => {
            tracing::error!(plugin = %name, error = %reason, "plugin rejected");
        }
        (ReloadOutcome::Pending(reason), _) => {
            tracing::info!(plugin = %name, reason = %reason, "plugin file not settled; left for the next reload");
        }
        _ => {}
    }
}

/// `<name>.wasm`, not hidden (`.acme.wasm.tmp`-style files of a write-then-rename are not
/// plugins yet).
pub(super) fn plugin_name(path: &Path) -> Option<String> {
    if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    (!name.starts_with('.') && !name.is_empty()).then(|| name.to_owned())
}

/// Why a plugin file was not read.
enum Unsettled {
    /// Its size changed while it was read: still being written; tried at the next reload.
    Growing(String),
    /// It cannot be read at all (permissions, say): a failure, reported as such.
    Unreadable(String),
}

/// The file's bytes, if its size did not change while it was read (a file written in
/// place and still growing is read again at the next reload).
async fn read_settled(path: &Path) -> Result<Vec<u8>, Unsettled> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| Unsettled::Unreadable(format!("cannot read: {e}")))?;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| Unsettled::Unreadable(format!("cannot stat: {e}")))?
        .len();
    if size != bytes.len() as u64 {
        return Err(Unsettled::Growing(format!(
            "the file changed while it was read ({} then {size} bytes)",
            bytes.len()
        )));
    }
    Ok(bytes)
}
