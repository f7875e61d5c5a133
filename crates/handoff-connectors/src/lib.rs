//! Connectors: how Handoff talks to each vendor. This crate holds the outbound HTTP client every
//! connector shares the construction of: certificates always verified, a private CA and a
//! client certificate (mTLS) per destination when configured. Vendor mappings, response
//! classes and deletion calls join it one module per vendor kind.

pub mod http;
