//! Unit tests of `effects`.
