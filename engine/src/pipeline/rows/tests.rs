//! Unit tests of `rows`.
