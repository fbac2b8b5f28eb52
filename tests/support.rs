//! Shared plumbing of the integration tests, one file per role: where the real services are
//! (`services`), one test's world with its own database and topics (`world`), producing to
//! Kafka (`kafka`), reading the database (`database`), the events produced (`events`),
//! plugins (`plugins`), templates (`templates`), the SSE client (`sse`), the REST client
//! (`api`), the admin listener (`admin`), Mailpit (`mailpit`), an SMTP relay the test takes
//! down and brings back (`relay`), the published contracts (`contracts`), and waiting
//! (`wait`).
//!
//! Every test file takes it all with `use crate::support::*;`.

// Each test uses some of it: what one binary leaves unused is not dead.
#![allow(dead_code)]

mod admin;
mod api;
mod contracts;
mod database;
mod events;
mod kafka;
mod mailpit;
mod plugins;
mod relay;
mod services;
mod sse;
mod templates;
mod wait;
mod world;

// What tests name; `database` and `kafka` only add methods to `World`.
pub use admin::*;
pub use api::*;
pub use contracts::*;
pub use events::*;
pub use mailpit::*;
pub use plugins::*;
pub use relay::*;
pub use services::*;
pub use sse::*;
pub use templates::*;
pub use wait::*;
pub use world::*;
