//! Workspaces, API keys and workspace-scoped channels, conformance on both backends.

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald_engine::delivery::{NewChannel, Platform, DISCONNECTED};
use herald_engine::{Store, StoreError};
use uuid::Uuid;

conformance!(
    workspaces_and_keys,
    keys_are_scoped_and_revocable,
    channels_are_listed_per_workspace_and_disconnect_wipes_secrets,
);

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("time")
}

async fn workspaces_and_keys(store: Arc<dyn Store>) {
    let t = store.tenancy();
    let a = t.create_workspace("Acme", now()).await.expect("create");
    let b = t.create_workspace("Beta", now()).await.expect("create");
    assert_eq!(t.workspace(a.id).await.expect("get"), Some(a.clone()));
    assert_eq!(t.workspace(Uuid::new_v4()).await.expect("get"), None);
    for bad in ["", "   ", "a\u{0}b", &"x".repeat(201)] {
        assert!(
            matches!(
                t.create_workspace(bad, now()).await,
                Err(StoreError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    let first = t.workspaces(None, 1).await.expect("page 1");
    let rest = t.workspaces(Some(first[0].id), 10).await.expect("page 2");
    let mut all: Vec<Uuid> = first.iter().chain(&rest).map(|w| w.id).collect();
    all.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(all, want);

    let k = t.create_api_key(a.id, "ci", now()).await.expect("key");
    assert!(k.secret.starts_with(&k.key.prefix));
    assert_eq!(k.secret.len(), "hk_".len() + 16 + 1 + 64);
    let found = t
        .authenticate(&k.secret)
        .await
        .expect("auth")
        .expect("valid");
    assert_eq!(found.workspace_id, a.id);
    assert_eq!(found.id, k.key.id);
    assert_eq!(t.authenticate("hk_nope").await.expect("auth"), None);
    let mut wrong = k.secret.clone();
    wrong.pop();
    wrong.push('x');
    assert_eq!(t.authenticate(&wrong).await.expect("auth"), None);
    assert!(matches!(
        t.create_api_key(Uuid::new_v4(), "x", now()).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn keys_are_scoped_and_revocable(store: Arc<dyn Store>) {
    let t = store.tenancy();
    let a = t.create_workspace("A", now()).await.expect("a");
    let b = t.create_workspace("B", now()).await.expect("b");
    let ka = t.create_api_key(a.id, "a1", now()).await.expect("key");
    let kb = t.create_api_key(b.id, "b1", now()).await.expect("key");
    let listed = t.api_keys(a.id, None, 10).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, ka.key.id);
    assert!(
        !t.revoke_api_key(b.id, ka.key.id, now())
            .await
            .expect("revoke"),
        "B cannot revoke A's key"
    );
    assert!(t.authenticate(&ka.secret).await.expect("auth").is_some());
    assert!(t
        .revoke_api_key(a.id, ka.key.id, now())
        .await
        .expect("revoke"));
    assert!(!t
        .revoke_api_key(a.id, ka.key.id, now())
        .await
        .expect("again"));
    assert_eq!(t.authenticate(&ka.secret).await.expect("auth"), None);
    assert!(t.authenticate(&kb.secret).await.expect("auth").is_some());
    let listed = t.api_keys(a.id, None, 10).await.expect("list");
    assert_eq!(listed[0].revoked_at, Some(now()));
}

fn new_channel(ws: Uuid, sender: &str) -> NewChannel {
    NewChannel {
        workspace_id: ws,
        platform: Platform::Whatsapp,
        name: "c".into(),
        sender_id: sender.into(),
        portfolio_id: None,
        access_token: "token".into(),
        app_secret: "secret".into(),
        verify_token: "verify".into(),
        graph_base_url: None,
        api_version: None,
        limits: None,
    }
}

async fn channels_are_listed_per_workspace_and_disconnect_wipes_secrets(store: Arc<dyn Store>) {
    let d = store.delivery();
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let mut mine = Vec::new();
    for n in 0..3 {
        mine.push(
            d.create_channel(&new_channel(a, &format!("a{n}")), now())
                .await
                .expect("create")
                .id,
        );
    }
    let theirs = d
        .create_channel(&new_channel(b, "b0"), now())
        .await
        .expect("create")
        .id;
    mine.sort();
    let p1 = d.workspace_channels(a, None, 2).await.expect("page");
    let p2 = d
        .workspace_channels(a, Some(p1[1].id), 2)
        .await
        .expect("page");
    let got: Vec<Uuid> = p1.iter().chain(&p2).map(|c| c.id).collect();
    assert_eq!(got, mine);
    assert!(!d
        .disconnect_channel(a, theirs, now())
        .await
        .expect("foreign"));
    assert!(d.disconnect_channel(a, mine[0], now()).await.expect("own"));
    let gone = d.channel(mine[0]).await.expect("read").expect("kept");
    assert_eq!(
        (
            gone.access_token.as_str(),
            gone.app_secret.as_str(),
            gone.verify_token.as_str()
        ),
        ("", "", "")
    );
    assert_eq!(gone.paused_reason.as_deref(), Some(DISCONNECTED));
    assert_eq!(
        d.seal_secrets().await.expect("seal"),
        0,
        "a disconnected channel's secrets are not resurrected as empty ciphertext"
    );
    let other = d.channel(theirs).await.expect("read").expect("exists");
    assert_eq!(other.access_token, "token");
}
