//! One integration-test binary: every test starts the real `tidings` binary on an ephemeral
//! loopback port and talks to it as a client would. Shared helpers live in `support`.

mod support;
mod smoke;
