//! Jobs: named commands from the configuration, run on a schedule or on demand, each run's
//! output streamed into its own channel. Feed specs are resolved here too (`spec`), since both
//! come from the same configuration sections.

pub mod execute;
pub mod process;
pub mod run;
pub mod spec;
pub mod supervisor;
