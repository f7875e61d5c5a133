//! Handoff's pure core: the event model, ingest parsing and normalisation, the configuration
//! model with its validation, consent decoding and the policy engine. Nothing in this crate performs I/O or needs an async runtime, so it
//! builds and tests fast and can be fuzzed in isolation.

pub mod auth;
pub mod config;
pub mod consent;
pub mod ids;
pub mod ingest;
pub mod policy;
pub mod subject;
pub mod time_fmt;

pub use ids::{MessageKind, SourceId};
