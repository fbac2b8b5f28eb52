//! Unit tests of `dead_letter`.
