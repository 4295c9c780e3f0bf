//! The master key that encrypts channel secrets, and `herald keys generate|rotate`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use clap::Subcommand;
use herald_engine::crypto::{generate_key, Keyring};
use tracing::{info, warn};

use crate::settings::Settings;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Print a new random master key (base64) for HERALD_MASTER_KEY.
    Generate,
    /// Re-encrypt every channel's secrets under HERALD_MASTER_KEY; the old key goes in
    /// HERALD_PREVIOUS_MASTER_KEYS for the run (and may be dropped afterwards).
    Rotate,
}

pub async fn run(settings: Settings, which: KeysCommand) -> Result<(), Box<dyn std::error::Error>> {
    match which {
        KeysCommand::Generate => {
            println!("{}", generate_key());
            Ok(())
        }
        KeysCommand::Rotate => {
            let store = crate::open_store(&settings).await?;
            let keyring = keyring(&settings)?
                .ok_or("master_key (HERALD_MASTER_KEY) must be set to the new key to rotate")?;
            let changed = store.delivery().seal_secrets().await?;
            println!(
                "{changed} channel(s) re-encrypted under key {}",
                keyring.current_id()
            );
            Ok(())
        }
    }
}

/// The keyring the settings give: `master_key` (with `previous_master_keys`); on SQLite without
/// it, the key in `master_key_file`, created if missing. None on PostgreSQL without a key:
/// every process sharing a database must use the same key, so none is made up.
pub fn keyring(settings: &Settings) -> Result<Option<Arc<Keyring>>, Box<dyn std::error::Error>> {
    let key = match &settings.master_key {
        Some(k) => k.0.clone(),
        None if settings.database_url.starts_with("sqlite:") => {
            key_file(&settings.master_key_file)?
        }
        None => return Ok(None),
    };
    Ok(Some(Arc::new(
        Keyring::parse(
            &key,
            &settings
                .previous_master_keys
                .iter()
                .map(|k| k.0.clone())
                .collect::<Vec<_>>(),
        )
        .map_err(|e| format!("master key: {e}"))?,
    )))
}

/// Reads the key file, or creates it (readable by its owner only) with a new key.
fn key_file(path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            herald_engine::crypto::parse_key(&text)
                .map_err(|e| format!("master_key_file {}: {e}", path.display()))?;
            Ok(text.trim().to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut f) => {
                    f.write_all(format!("{key}\n").as_bytes())?;
                    f.sync_all()?;
                    warn!(
                        file = %path.display(),
                        "generated a master key for channel secrets; back it up with the database (without it the secrets cannot be read), or set HERALD_MASTER_KEY"
                    );
                    Ok(key)
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => key_file(path),
                Err(e) => {
                    Err(format!("cannot create master_key_file {}: {e}", path.display()).into())
                }
            }
        }
        Err(e) => Err(format!("cannot read master_key_file {}: {e}", path.display()).into()),
    }
}

/// Seals secrets written before encryption (or under a previous key) once a key is available.
pub async fn seal_legacy(store: &dyn herald_engine::Store) {
    match store.delivery().seal_secrets().await {
        Ok(0) => {}
        Ok(n) => info!(
            channels = n,
            "channel secrets encrypted under the current master key"
        ),
        Err(e) => {
            warn!(error = %e, "channel secrets could not all be encrypted; `herald keys rotate` retries")
        }
    }
}
