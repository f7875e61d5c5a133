//! Connectors: how Handoff talks to each vendor.
//!
//! - [`http`]: the outbound HTTP client of a destination (certificates always verified, a
//!   private CA and a client certificate per destination when configured);
//! - [`wire`]: what all connectors share: the request type, response classes, delivery ids;
//! - one module per vendor kind, each a pure mapping from decided payloads to the vendor's
//!   request, tested against the vendor's documented examples: [`webhook`] (Standard
//!   Webhooks signatures), [`meta_capi`], [`ga4`], [`stripe`], [`segment`].
//!
//! - [`erasure`]: how each vendor is told to erase a subject (its deletion call, or a manual
//!   task with instructions where it has none).
//!
//! The delivery engine that sends these requests is in `handoff-server`.

pub mod connector;
pub mod erasure;
pub mod ga4;
pub mod http;
pub mod meta_capi;
pub mod segment;
pub mod stripe;
pub mod webhook;
pub mod wire;
