//! Delivery through Meta's Graph API: the client, the error policy, the send worker, and
//! the processing of Meta's webhooks.

pub mod client;
mod http;
pub mod policy;
pub mod recorder;
pub mod send;
pub mod webhook;

pub use client::{ClientConfig, MetaClient, SendError};
pub use send::{SendConfig, SendWorker};
pub use webhook::WebhookWorker;
