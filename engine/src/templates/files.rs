//! Reading one tenant folder from disk: its partials and the parts of its templates.
//!
//! Kept apart from building the Handlebars registries so that a file that cannot be read is
//! remembered by template name (and reported as that template's problem) rather than
//! stopping the load of everything else.

use std::collections::HashMap;
use std::path::Path;

use super::PARTS;

/// Files of one tenant folder: partial name → (file, source); (template, part) → (file, source).
#[derive(Default, Clone)]
pub(super) struct TenantFiles {
    pub(super) partials: HashMap<String, (String, String)>,
    pub(super) parts: HashMap<(String, &'static str), (String, String)>,
    /// Files that could not be read, by template name.
    pub(super) unreadable: HashMap<String, String>,
}

pub(super) fn read_tenant_dir(dir: &Path) -> std::io::Result<TenantFiles> {
    let mut files = TenantFiles::default();
    if !dir.is_dir() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let folder = entry.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(entry.path())? {
            let path = file?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("hbs") {
                continue;
            }
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            let shown = path.display().to_string();
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    files
                        .unreadable
                        .insert(folder.clone(), format!("{shown}: {e}"));
                    continue;
                }
            };
            if folder == "partials" {
                files.partials.insert(stem, (shown, source));
            } else if let Some(part) = PARTS.iter().find(|p| **p == stem) {
                files.parts.insert((folder.clone(), part), (shown, source));
            }
        }
    }
    Ok(files)
}
