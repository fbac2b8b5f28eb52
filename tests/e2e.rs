//! End-to-end tests on the real services: Kafka in, PostgreSQL, SSE and SMTP (Mailpit) out,
//! routing by real WebAssembly components. One test binary (linking is the slow part), one
//! file per subsystem; `support` is their shared plumbing. `tests/README.md` names every
//! class of test in the repository and how to run one.
//!
//! Run through `scripts/test.sh`, which starts the services and builds the plugins.

// These tests read and set up rows directly, with SQL of their own: `engine/clippy.toml`
// keeps statements inside `store` for the engine, not for what checks it from outside.
#![allow(clippy::disallowed_methods)]

mod auth;
mod cluster;
mod contracts;
mod database;
mod dead_letters;
mod edge;
mod email;
mod guests;
mod inbox;
mod isolation;
mod lanes;
mod operator;
mod pipeline;
mod plugins;
mod reload;
mod stream;
mod support;
mod templating;
