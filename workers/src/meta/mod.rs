//! Delivery through Meta's Graph API: the client, the error policy and the send worker.

pub mod client;
pub mod policy;
pub mod recorder;
pub mod send;

pub use client::{ClientConfig, MetaClient, SendError};
pub use send::{SendConfig, SendWorker};
