//! Secrets at rest: AES-256-GCM under a master key (`HERALD_MASTER_KEY`), with the key's id
//! stored beside each ciphertext so that keys can be rotated (`herald keys rotate`) while old
//! ciphertexts stay readable with the previous keys.
//!
//! A sealed value is `nonce (12 bytes) || ciphertext || tag (16 bytes)`. Its associated data
//! binds it to where it belongs (a channel's id), so a ciphertext copied onto another row does
//! not open.
//!
//! Architecture invariant: secrets are encrypted and decrypted only inside the stores; every
//! other layer sees plaintext in memory and never writes it anywhere (the `Debug` of types that
//! hold secrets redacts them).

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Why a key or a ciphertext was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("a master key must be 32 bytes, as 64 hex digits or base64 (openssl rand -base64 32)")]
    BadKey,
    #[error("no master key is configured (set HERALD_MASTER_KEY)")]
    NoKey,
    #[error("the secret was encrypted with key {0}, which is not configured")]
    UnknownKey(String),
    #[error("the secret does not decrypt: wrong key, or the data was altered")]
    Undecryptable,
}

/// One key and its id (the first 16 hex digits of its SHA-256).
#[derive(Clone)]
struct DataKey {
    id: String,
    cipher: Aes256Gcm,
}

impl DataKey {
    fn new(bytes: &[u8; 32]) -> DataKey {
        let id = hex::encode(Sha256::digest(bytes))[..16].to_owned();
        DataKey {
            id,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)),
        }
    }
}

/// The current key (used to encrypt) and previous ones (still accepted to decrypt).
#[derive(Clone)]
pub struct Keyring {
    current: DataKey,
    previous: Vec<DataKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A secret encrypted under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub blob: Vec<u8>,
}

/// Reads a 32-byte key written as 64 hex digits or as base64.
pub fn parse_key(text: &str) -> Result<[u8; 32], CryptoError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|_| CryptoError::BadKey)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| CryptoError::BadKey)?
    };
    bytes.try_into().map_err(|_| CryptoError::BadKey)
}

/// A new random key, as base64 (what `herald keys generate` prints).
pub fn generate_key() -> String {
    let key = Aes256Gcm::generate_key(OsRng);
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl Keyring {
    /// `current` encrypts; `previous` keys only decrypt (during a rotation).
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> Keyring {
        let current = DataKey::new(current);
        let previous = previous
            .iter()
            .map(DataKey::new)
            .filter(|k| k.id != current.id)
            .collect();
        Keyring { current, previous }
    }

    /// From the settings' text forms.
    pub fn parse(current: &str, previous: &[String]) -> Result<Keyring, CryptoError> {
        let previous: Vec<[u8; 32]> = previous
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<_, _>>()?;
        Ok(Keyring::new(&parse_key(current)?, &previous))
    }

    /// The id of the key new secrets are encrypted with.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Encrypts `plaintext` bound to `context` (which must be given again to open it).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Sealed {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            // aes-gcm fails only for messages over 64 GiB.
            .unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        Sealed {
            key_id: self.current.id.clone(),
            blob,
        }
    }

    /// Decrypts a sealed secret with the key it names.
    pub fn open(&self, key_id: &str, context: &[u8], blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, ciphertext) = blob.split_at(12);
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn round_trip_and_context_binding() {
        let ring = Keyring::new(&key(1), &[]);
        let sealed = ring.seal(b"channel-a", b"EAAG-token");
        assert_ne!(sealed.blob, b"EAAG-token");
        assert_eq!(
            ring.open(&sealed.key_id, b"channel-a", &sealed.blob),
            Ok(b"EAAG-token".to_vec())
        );
        assert_eq!(
            ring.open(&sealed.key_id, b"channel-b", &sealed.blob),
            Err(CryptoError::Undecryptable),
            "a ciphertext moved to another row does not open"
        );
        let mut altered = sealed.blob.clone();
        altered[14] ^= 1;
        assert_eq!(
            ring.open(&sealed.key_id, b"channel-a", &altered),
            Err(CryptoError::Undecryptable)
        );
        assert_eq!(
            ring.open(&sealed.key_id, b"channel-a", &altered[..5]),
            Err(CryptoError::Undecryptable)
        );
        // Two seals of one secret differ (random nonces).
        assert_ne!(ring.seal(b"c", b"x").blob, ring.seal(b"c", b"x").blob);
    }

    #[test]
    fn rotation_keeps_old_ciphertexts_readable() {
        let old = Keyring::new(&key(1), &[]);
        let sealed = old.seal(b"c", b"secret");
        let new = Keyring::new(&key(2), &[key(1)]);
        assert_ne!(new.current_id(), old.current_id());
        assert_eq!(
            new.open(&sealed.key_id, b"c", &sealed.blob),
            Ok(b"secret".to_vec())
        );
        let without_old = Keyring::new(&key(2), &[]);
        assert_eq!(
            without_old.open(&sealed.key_id, b"c", &sealed.blob),
            Err(CryptoError::UnknownKey(old.current_id().to_owned()))
        );
    }

    #[test]
    fn keys_parse_from_hex_and_base64_only_at_32_bytes() {
        let b64 = generate_key();
        assert!(parse_key(&b64).is_ok());
        assert_eq!(parse_key(&"ab".repeat(32)), Ok([0xab; 32]));
        assert_eq!(parse_key("short"), Err(CryptoError::BadKey));
        assert_eq!(parse_key(&"ab".repeat(31)), Err(CryptoError::BadKey));
        assert_eq!(parse_key(""), Err(CryptoError::BadKey));
        let debug = format!("{:?}", Keyring::parse(&b64, &[]).expect("key"));
        assert!(!debug.contains(&b64), "Debug shows key ids only");
    }
}
