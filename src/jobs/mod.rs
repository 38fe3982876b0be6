//! Command jobs: the process layer that starts one child and streams what it prints.

pub mod process;
