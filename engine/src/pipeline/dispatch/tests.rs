//! Unit tests of `dispatch`.
