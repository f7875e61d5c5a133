//! Connectors: how Handoff talks to each vendor.
//!
//! - [`http`]: the outbound HTTP client of a destination (certificates always verified, a
//!   private CA and a client certificate per destination when configured);
//! - [`wire`]: what all connectors share: the request type, response classes, delivery ids;
//! - one module per vendor kind, each a pure mapping from decided payloads to the vendor's
//!   request, tested against the vendor's documented examples: [`webhook`] (Standard
//!   Webhooks signatures), [`meta_capi`], [`ga4`], [`stripe`], [`segment`].
//!
//! The delivery engine (queues, retries, breaker, dead letters) that sends these requests is
//! the next piece; deletion calls for erasure requests come with data-subject requests.

pub mod connector;
pub mod ga4;
pub mod http;
pub mod meta_capi;
pub mod segment;
pub mod stripe;
pub mod webhook;
pub mod wire;
