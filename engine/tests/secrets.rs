//! Channel secrets at rest, on both backends: only ciphertext is stored, another key cannot
//! read it, `seal_secrets` rotates to a new key (the previous one still reads until then) and
//! seals rows written before encryption.

mod common;

use std::sync::Arc;

use herald_engine::crypto::{CryptoError, Keyring};
use herald_engine::delivery::{NewChannel, Platform};
use herald_engine::store::{PgStore, PgStoreConfig, SqliteStore, SqliteStoreConfig};
use herald_engine::{Store, StoreError};
use uuid::Uuid;

const TOKEN: &str = "EAAG-very-secret-token-0123456789";
const APP_SECRET: &str = "app-secret-fedcba";
const VERIFY: &str = "verify-token-42";

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

fn ring(current: u8, previous: &[u8]) -> Option<Arc<Keyring>> {
    let previous: Vec<[u8; 32]> = previous.iter().map(|n| key(*n)).collect();
    Some(Arc::new(Keyring::new(&key(current), &previous)))
}

/// Opens the same database with a given keyring, and runs raw SQL on it.
enum Db {
    Pg(String),
    Sqlite(std::path::PathBuf),
}

impl Db {
    async fn open(&self, keyring: Option<Arc<Keyring>>) -> Arc<dyn Store> {
        match self {
            Db::Pg(schema) => {
                let s = PgStore::connect(&PgStoreConfig {
                    url: common::pg_url(),
                    max_connections: 4,
                    acquire_timeout: std::time::Duration::from_secs(10),
                    schema: Some(schema.clone()),
                    keyring,
                })
                .await
                .expect("connect");
                s.migrate().await.expect("migrate");
                Arc::new(s)
            }
            Db::Sqlite(path) => {
                let s = SqliteStore::connect(&SqliteStoreConfig {
                    url: format!("sqlite:{}", path.display()),
                    acquire_timeout: std::time::Duration::from_secs(10),
                    synchronous_full: false,
                    keyring,
                })
                .await
                .expect("open");
                s.migrate().await.expect("migrate");
                Arc::new(s)
            }
        }
    }

    /// (access_token, app_secret, verify_token, secrets) as stored.
    async fn raw(&self, id: Uuid) -> (String, String, String, Option<Vec<u8>>) {
        let sql = "SELECT access_token, app_secret, verify_token, secrets FROM herald_channels";
        match self {
            Db::Pg(schema) => {
                let pool = sqlx::PgPool::connect(&common::pg_url())
                    .await
                    .expect("pool");
                sqlx::query_as(&format!(
                    "{} WHERE id = $1",
                    sql.replace("herald_channels", &format!("{schema}.herald_channels"))
                ))
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("raw row")
            }
            Db::Sqlite(path) => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
                    .await
                    .expect("pool");
                sqlx::query_as(&format!("{sql} WHERE id = ?1"))
                    .bind(id.to_string())
                    .fetch_one(&pool)
                    .await
                    .expect("raw row")
            }
        }
    }

    /// Turns a row back into a pre-encryption row with plaintext columns.
    async fn make_legacy(&self, id: Uuid) {
        let sql = "UPDATE herald_channels SET secrets = NULL, secrets_key_id = NULL, \
                   access_token = 'legacy-token', app_secret = 'legacy-secret', verify_token = 'legacy-verify'";
        match self {
            Db::Pg(schema) => {
                let pool = sqlx::PgPool::connect(&common::pg_url())
                    .await
                    .expect("pool");
                sqlx::query(&format!(
                    "{} WHERE id = $1",
                    sql.replace("herald_channels", &format!("{schema}.herald_channels"))
                ))
                .bind(id)
                .execute(&pool)
                .await
                .expect("legacy");
            }
            Db::Sqlite(path) => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
                    .await
                    .expect("pool");
                sqlx::query(&format!("{sql} WHERE id = ?1"))
                    .bind(id.to_string())
                    .execute(&pool)
                    .await
                    .expect("legacy");
            }
        }
    }
}

fn is_key_error(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Secrets(CryptoError::UnknownKey(_) | CryptoError::NoKey)
    )
}

async fn secrets_round_trip(db: Db) {
    let a = db.open(ring(1, &[])).await;
    let ch = a
        .delivery()
        .create_channel(
            &NewChannel {
                workspace_id: Uuid::new_v4(),
                platform: Platform::Whatsapp,
                name: "secret".into(),
                sender_id: "1555".into(),
                portfolio_id: None,
                access_token: TOKEN.into(),
                app_secret: APP_SECRET.into(),
                verify_token: VERIFY.into(),
                graph_base_url: None,
                api_version: None,
                limits: None,
            },
            chrono::Utc::now(),
        )
        .await
        .expect("create");
    assert_eq!(ch.access_token, TOKEN);

    // Only ciphertext is stored.
    let (token, secret, verify, sealed) = db.raw(ch.id).await;
    assert_eq!(
        (token.as_str(), secret.as_str(), verify.as_str()),
        ("", "", "")
    );
    let sealed = sealed.expect("ciphertext");
    for plain in [TOKEN, APP_SECRET, VERIFY] {
        assert!(
            !sealed.windows(plain.len()).any(|w| w == plain.as_bytes()),
            "{plain} is not in the stored bytes"
        );
    }

    // Without the key, or with another one, nothing is read.
    let other = db.open(ring(2, &[])).await;
    let e = other
        .delivery()
        .channel(ch.id)
        .await
        .expect_err("wrong key");
    assert!(is_key_error(&e), "{e}");
    let none = db.open(None).await;
    assert!(is_key_error(
        &none.delivery().channel(ch.id).await.expect_err("no key")
    ));
    assert!(is_key_error(
        &none.delivery().seal_secrets().await.expect_err("no key")
    ));

    // Rotation: key 2 with key 1 as previous reads, re-encrypts, and then key 1 cannot read.
    let rotating = db.open(ring(2, &[1])).await;
    let read = rotating
        .delivery()
        .channel(ch.id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(read.app_secret, APP_SECRET);
    assert_eq!(rotating.delivery().seal_secrets().await.expect("rotate"), 1);
    assert_eq!(
        rotating.delivery().seal_secrets().await.expect("again"),
        0,
        "nothing left to rotate"
    );
    assert!(is_key_error(
        &a.delivery().channel(ch.id).await.expect_err("old key only")
    ));
    let b = other
        .delivery()
        .channel(ch.id)
        .await
        .expect("new key reads")
        .expect("exists");
    assert_eq!(
        (b.access_token.as_str(), b.verify_token.as_str()),
        (TOKEN, VERIFY)
    );

    // A row written before encryption is read as it is, and sealed.
    db.make_legacy(ch.id).await;
    let legacy = other
        .delivery()
        .channel(ch.id)
        .await
        .expect("legacy")
        .expect("exists");
    assert_eq!(legacy.access_token, "legacy-token");
    assert_eq!(other.delivery().seal_secrets().await.expect("seal"), 1);
    let (token, _, _, sealed) = db.raw(ch.id).await;
    assert_eq!(token, "");
    assert!(sealed.is_some());
    assert_eq!(
        other
            .delivery()
            .channel(ch.id)
            .await
            .expect("sealed")
            .expect("exists")
            .app_secret,
        "legacy-secret"
    );
}

#[tokio::test]
async fn postgres_secrets_are_sealed_and_rotate() {
    let schema = common::unique_name("t");
    let _guard = common::Dropped::Schema(schema.clone());
    secrets_round_trip(Db::Pg(schema)).await;
}

#[tokio::test]
async fn sqlite_secrets_are_sealed_and_rotate() {
    let path = common::sqlite_path();
    let _guard = common::Dropped::File(path.clone());
    secrets_round_trip(Db::Sqlite(path)).await;
}
