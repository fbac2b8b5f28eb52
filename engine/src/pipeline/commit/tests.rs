//! Unit tests of `commit`.
