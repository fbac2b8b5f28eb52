//! The registry's decisions without a compiled component: which plugin serves a tenant
//! (its own, the configured one, the default), and what a reload does to a slot (replace,
//! keep, remove; a broken new version never replaces a working one). A [`Fake`] stands in
//! for a loaded plugin: the rules only ask a ready slot its world.

use std::collections::{BTreeMap, HashMap};

use super::load::{Change, note_rejections, removed, settle};
use super::{MAX_LISTED, Registry, ReloadOutcome, Reloaded, Serving, Slot, Slots, Stats, listed};
use crate::config::{PluginConfig, TenantConfig};
use crate::plugin::{PluginError, World};

/// A loaded plugin as far as the rules care: its world, and which build it is.
#[derive(Debug, Clone, PartialEq)]
struct Fake {
    world: World,
    build: &'static str,
}

impl Serving for Fake {
    fn world(&self) -> World {
        self.world
    }
}

fn routing(build: &'static str) -> Slot<Fake> {
    Slot::Ready(Fake {
        world: World::Routing,
        build,
    })
}

fn templating(build: &'static str) -> Slot<Fake> {
    Slot::Ready(Fake {
        world: World::Templating,
        build,
    })
}

fn slots(entries: &[(&str, Slot<Fake>)]) -> Slots<Fake> {
    entries
        .iter()
        .map(|(name, slot)| (name.to_string(), slot.clone()))
        .collect()
}

/// A registry of tenants `acme` (routed by `acme-rules`, rendered by `acme-mail`) and
/// `globex` (nothing configured); the default plugin is `default`.
fn registry() -> Registry {
    let mut tenants = BTreeMap::new();
    tenants.insert(
        "acme".to_string(),
        TenantConfig {
            plugin: Some("acme-rules".into()),
            templating_plugin: Some("acme-mail".into()),
            ..TenantConfig::default()
        },
    );
    tenants.insert("globex".to_string(), TenantConfig::default());
    Registry::new(&PluginConfig::default(), tenants)
}

fn build(result: Result<Fake, PluginError>) -> &'static str {
    result.expect("a plugin is chosen").build
}

#[test]
fn a_tenant_is_routed_by_its_configured_plugin_then_its_own_file_then_the_default() {
    let r = registry();
    let all = slots(&[
        ("acme-rules", routing("configured")),
        ("acme", routing("by-name")),
        ("globex", routing("globex-file")),
        ("default", routing("default")),
    ]);
    assert_eq!(build(r.choose_routing(&all, "acme")), "configured");
    assert_eq!(build(r.choose_routing(&all, "globex")), "globex-file");
    // Not in the configuration, no file of its own: the default plugin.
    assert_eq!(build(r.choose_routing(&all, "initech")), "default");
    // A tenant's own file is used when nothing is configured for it.
    let by_name = slots(&[
        ("initech", routing("initech-file")),
        ("default", routing("d")),
    ]);
    assert_eq!(build(r.choose_routing(&by_name, "initech")), "initech-file");
}

#[test]
fn a_configured_plugin_that_is_missing_or_broken_is_never_replaced_by_the_default() {
    let r = registry();
    let missing = slots(&[("default", routing("default"))]);
    let e = r.choose_routing(&missing, "acme").unwrap_err();
    assert!(matches!(e, PluginError::Unavailable { ref plugin, .. } if plugin == "acme-rules"));
    assert!(
        e.to_string()
            .contains("tenants.acme.plugin names acme-rules.wasm"),
        "{e}"
    );
    let broken = slots(&[
        ("acme-rules", Slot::Broken("bad magic".into())),
        ("default", routing("default")),
    ]);
    let e = r.choose_routing(&broken, "acme").unwrap_err();
    assert!(matches!(e, PluginError::Unavailable { .. }), "{e:?}");
    assert!(
        e.to_string().contains("it failed to load: bad magic"),
        "{e}"
    );
}

#[test]
fn without_a_working_default_unconfigured_tenants_stall() {
    let r = registry();
    let e = r
        .choose_routing(&Slots::<Fake>::new(), "globex")
        .unwrap_err();
    assert!(matches!(e, PluginError::NoDefault { .. }), "{e:?}");
    assert!(e.to_string().contains("default.wasm is not in"), "{e}");
    let broken = slots(&[("default", Slot::Broken("trap at start".into()))]);
    let e = r.choose_routing(&broken, "globex").unwrap_err();
    assert!(matches!(e, PluginError::NoDefault { .. }), "{e:?}");
    assert!(e.to_string().contains("is broken: trap at start"), "{e}");
    assert_eq!(r.choose_default(&broken), None);
}

#[test]
fn a_plugin_of_the_wrong_world_serves_nobody_in_the_other() {
    let r = registry();
    let mixed = slots(&[
        ("acme-rules", templating("t")),
        ("acme-mail", routing("r")),
        ("default", templating("t")),
    ]);
    let e = r.choose_routing(&mixed, "acme").unwrap_err();
    assert!(e.to_string().contains("is a templating plugin"), "{e}");
    let e = r.choose_templating(&mixed, "acme").unwrap().unwrap_err();
    assert!(e.to_string().contains("which is a routing plugin"), "{e}");
    // A default plugin of the templating world is no default for routing.
    assert_eq!(r.choose_default(&mixed), None);
}

#[test]
fn templating_is_chosen_only_where_configured() {
    let r = registry();
    let all = slots(&[("acme-mail", templating("mail")), ("default", routing("d"))]);
    assert_eq!(build(r.choose_templating(&all, "acme").unwrap()), "mail");
    // Nothing configured: the tenant's files render directly.
    assert!(r.choose_templating(&all, "globex").is_none());
    assert!(r.choose_templating(&all, "initech").is_none());
    let e = r
        .choose_templating(&Slots::<Fake>::new(), "acme")
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string().contains("acme-mail.wasm, which is not in"),
        "{e}"
    );
}

#[test]
fn the_listing_names_whom_each_plugin_serves() {
    let r = registry();
    assert_eq!(r.tenants_of("acme-rules", World::Routing), ["acme"]);
    assert_eq!(r.tenants_of("globex", World::Routing), ["globex"]);
    assert_eq!(r.tenants_of("default", World::Routing), ["*"]);
    // `<tenant>.wasm` for a tenant not in the configuration.
    assert_eq!(r.tenants_of("initech", World::Routing), ["initech"]);
    // acme is configured to another plugin: its own file serves nobody.
    assert!(r.tenants_of("acme", World::Routing).is_empty());
    assert_eq!(r.tenants_of("acme-mail", World::Templating), ["acme"]);
}

fn ready(build: &'static str) -> Fake {
    Fake {
        world: World::Routing,
        build,
    }
}

#[test]
fn a_new_or_changed_file_that_loads_replaces_the_slot() {
    let (slot, outcome) = settle(None, Change::Loaded(ready("v1")));
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v1"));
    assert_eq!(outcome, ReloadOutcome::Loaded);
    let (slot, outcome) = settle(Some(&routing("v1")), Change::Loaded(ready("v2")));
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v2"));
    assert_eq!(outcome, ReloadOutcome::Loaded);
    // A broken plugin is fixed by a file that loads.
    let (slot, _) = settle(
        Some(&Slot::Broken("old".into())),
        Change::Loaded(ready("v3")),
    );
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v3"));
}

#[test]
fn a_broken_new_version_never_replaces_a_working_one() {
    let (slot, outcome) = settle(Some(&routing("v1")), Change::Failed("trap".into()));
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v1"));
    assert_eq!(outcome, ReloadOutcome::Rejected("trap".into()));
    // With nothing working under the name, the failure is remembered as broken.
    let (slot, outcome) = settle::<Fake>(None, Change::Failed("bad".into()));
    assert!(matches!(slot, Some(Slot::Broken(ref r)) if r == "bad"));
    assert_eq!(outcome, ReloadOutcome::Broken("bad".into()));
    let (slot, outcome) = settle::<Fake>(
        Some(&Slot::Broken("old".into())),
        Change::Failed("new".into()),
    );
    assert!(matches!(slot, Some(Slot::Broken(ref r)) if r == "new"));
    assert_eq!(outcome, ReloadOutcome::Broken("new".into()));
}

#[test]
fn unchanged_and_half_written_files_keep_their_slot() {
    let (slot, outcome) = settle(Some(&routing("v1")), Change::Unchanged);
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v1"));
    assert_eq!(outcome, ReloadOutcome::Unchanged);
    let (slot, outcome) = settle(Some(&routing("v1")), Change::Pending("growing".into()));
    assert!(matches!(slot, Some(Slot::Ready(ref f)) if f.build == "v1"));
    assert_eq!(outcome, ReloadOutcome::Pending("growing".into()));
    // A broken plugin stays broken until its file settles; a new file waits with no slot.
    let (slot, _) = settle(
        Some(&Slot::<Fake>::Broken("old".into())),
        Change::Pending("g".into()),
    );
    assert!(matches!(slot, Some(Slot::Broken(ref r)) if r == "old"));
    let (slot, _) = settle::<Fake>(None, Change::Pending("g".into()));
    assert!(slot.is_none());
}

#[test]
fn a_deleted_file_removes_its_plugin() {
    let before = slots(&[("acme", routing("a")), ("gone", routing("g"))]);
    let after = slots(&[("acme", routing("a")), ("new", routing("n"))]);
    assert_eq!(removed(&before, &after), ["gone"]);
    assert!(removed(&after, &after).is_empty());
}

#[test]
fn refused_candidates_are_remembered_until_the_name_settles() {
    let reloaded = |name: &str, outcome| Reloaded {
        name: name.into(),
        outcome,
    };
    let mut rejected = BTreeMap::new();
    note_rejections(
        &mut rejected,
        &[
            reloaded("acme", ReloadOutcome::Rejected("trap".into())),
            reloaded("globex", ReloadOutcome::Rejected("bad".into())),
        ],
    );
    assert_eq!(rejected.len(), 2);
    // Still being written: the refusal stands.
    note_rejections(
        &mut rejected,
        &[reloaded("acme", ReloadOutcome::Pending("g".into()))],
    );
    assert_eq!(rejected.get("acme").map(String::as_str), Some("trap"));
    // Reverted (unchanged), replaced, or gone: forgotten.
    note_rejections(
        &mut rejected,
        &[
            reloaded("acme", ReloadOutcome::Unchanged),
            reloaded("globex", ReloadOutcome::Removed),
        ],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
}

#[test]
fn statistics_count_per_version_and_forget_versions_no_longer_serving() {
    let stats = Stats::default();
    stats.record("acme", "v1", false);
    stats.record("acme", "v1", true);
    stats.record("acme", "v2", false);
    assert_eq!(stats.get("acme", "v1"), (2, 1));
    assert_eq!(stats.get("acme", "v2"), (1, 0));
    let serving: HashMap<&str, &str> = [("acme", "v2")].into();
    stats.retain(|name, digest| serving.get(name) == Some(&digest));
    assert_eq!(stats.get("acme", "v1"), (0, 0));
    assert_eq!(stats.get("acme", "v2"), (1, 0));
}

#[test]
fn readiness_lists_a_bounded_number_of_quarantines() {
    let quarantine = |i: usize| crate::plugin::Quarantine {
        plugin: "default".into(),
        tenant: format!("t{i:03}"),
        digest: "0123456789abcdef".into(),
        failures: 5,
    };
    assert_eq!(
        listed(vec![quarantine(1)]),
        ["default (0123456789ab) for tenant t001: 5 consecutive failures"]
    );
    let many = listed((0..MAX_LISTED + 7).map(quarantine).collect());
    assert_eq!(many.len(), MAX_LISTED + 1);
    assert_eq!(many.last().unwrap(), "and 7 more");
}
