//! A channel's secrets (access token, app secret, verify token) as both stores keep them: one
//! AES-256-GCM ciphertext per channel, bound to the channel's id, with the id of its key.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::{CryptoError, Keyring, Sealed};
use crate::error::{Result, StoreError};

#[derive(Serialize, Deserialize)]
pub(crate) struct ChannelSecrets {
    pub access_token: String,
    pub app_secret: String,
    pub verify_token: String,
}

/// Encrypts a channel's secrets under the current key.
pub(crate) fn seal(
    keyring: Option<&Keyring>,
    channel_id: Uuid,
    secrets: &ChannelSecrets,
) -> Result<Sealed> {
    let keyring = keyring.ok_or(CryptoError::NoKey)?;
    let json = serde_json::to_vec(secrets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(keyring.seal(channel_id.as_bytes(), &json))
}

/// The secrets of a stored channel: decrypted, or (a row written before encryption and not
/// sealed yet) the legacy plaintext columns.
pub(crate) fn open(
    keyring: Option<&Keyring>,
    channel_id: Uuid,
    sealed: Option<(String, Vec<u8>)>,
    legacy: ChannelSecrets,
) -> Result<ChannelSecrets> {
    let Some((key_id, blob)) = sealed else {
        return Ok(legacy);
    };
    let keyring = keyring.ok_or(CryptoError::NoKey)?;
    let json = keyring.open(&key_id, channel_id.as_bytes(), &blob)?;
    serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(e.to_string()))
}
