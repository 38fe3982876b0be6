//! Feeds: turning RSS, Atom and JSON Feed documents into Tidings entries.

pub mod parse;
pub mod poller;
