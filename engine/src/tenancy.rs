//! Workspaces (tenants) and their API keys.
//!
//! An API key is `hk_<id>_<secret>`: the id (16 hex digits) finds the key, the secret (32 random
//! bytes, hex) proves it. Only the SHA-256 of the whole key is stored; the key itself is shown
//! once, when it is created. A key belongs to one workspace, and every query an API caller makes
//! is scoped to it.
//!
//! Architecture invariant: nothing outside the store sees a stored key hash, and no store method
//! returns a key's secret except `create_api_key`, once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::Result;

/// A tenant: its channels, contacts, sends and keys are its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Workspace {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// An API key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub name: String,
    /// `hk_<id>_`: enough to recognise a key in a list, nothing to use it with.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key just created, with the only copy of its secret.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub key: ApiKey,
    /// The whole key, `hk_<id>_<secret>`, to show once.
    pub secret: String,
}

/// The SHA-256 of a presented key, as stored. Keys carry 256 random bits, so a plain hash
/// (rather than a slow password hash) is what makes a stolen table useless.
pub fn key_hash(presented: &str) -> Vec<u8> {
    Sha256::digest(presented.as_bytes()).to_vec()
}

/// A new key for `key_id`: `hk_<16 hex>_<64 hex>`, the secret from the operating system's
/// random generator.
pub fn new_key_text(key_id: Uuid) -> String {
    use aes_gcm::aead::rand_core::RngCore;
    let mut secret = [0u8; 32];
    aes_gcm::aead::OsRng.fill_bytes(&mut secret);
    format!("{}{}", key_prefix(key_id), hex::encode(secret))
}

/// `hk_<first 16 hex digits of the id>_`.
pub fn key_prefix(key_id: Uuid) -> String {
    format!("hk_{}_", &key_id.simple().to_string()[..16])
}

/// Where workspaces and keys live. Implemented by both stores.
#[async_trait]
pub trait TenancyStore: Send + Sync + 'static {
    async fn create_workspace(&self, name: &str, now: DateTime<Utc>) -> Result<Workspace>;
    async fn workspace(&self, id: Uuid) -> Result<Option<Workspace>>;
    /// Workspaces in id order after `after`, at most `limit`.
    async fn workspaces(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Workspace>>;

    /// A new key for the workspace; the returned secret is the only copy.
    async fn create_api_key(
        &self,
        workspace_id: Uuid,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<NewApiKey>;
    /// The workspace a presented key belongs to, if the key exists and is not revoked.
    async fn authenticate(&self, presented: &str) -> Result<Option<ApiKey>>;
    /// A workspace's keys in id order after `after`, at most `limit`.
    async fn api_keys(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ApiKey>>;
    /// Revokes a key of the workspace; false if it has no such key (or it was revoked).
    async fn revoke_api_key(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool>;
}

/// A workspace or key name: 1 to 200 characters, no control characters.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err("a name must have 1 to 200 characters".into());
    }
    if name.chars().any(char::is_control) {
        return Err("a name must not contain control characters".into());
    }
    Ok(())
}
