//! Contacts, conformance on both backends: create, conflicts, labels, patch, opt-out rules,
//! import upserts, workspace scoping, inbound senders by phone and by handle (Messenger,
//! Instagram) with their races, and contacts stored before migration 0008.

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald_engine::contacts::{
    ContactHandle, ContactPatch, InboundContact, InboundIdentity, NewContact,
};
use herald_engine::delivery::Platform;
use herald_engine::{Store, StoreError};
use serde_json::json;
use uuid::Uuid;

conformance!(
    create_read_list_by_label,
    patch_and_delete_stay_in_the_workspace,
    import_upserts_and_never_resubscribes,
    inbound_contacts_and_stop,
    messenger_senders_become_contacts_by_handle,
    racing_jobs_create_one_contact_per_new_handle,
    deleting_a_contact_removes_its_handles,
    handles_are_checked_before_anything_is_written,
);

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("time")
}

fn contact(phone: &str, labels: &[&str]) -> NewContact {
    NewContact {
        phone: phone.into(),
        name: Some("Ann".into()),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        attributes: json!({ "city": "Lisbon", "n": 1 })
            .as_object()
            .cloned()
            .expect("object"),
        opted_out: false,
    }
}

async fn create_read_list_by_label(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let ann = c
        .create_contact(ws, &contact("+1 555 000 0001", &["vip", "beta"]), now())
        .await
        .expect("create");
    assert_eq!(ann.phone.as_deref(), Some("+15550000001"));
    assert!(ann.handles.is_empty());
    assert_eq!(ann.labels, ["beta", "vip"]);
    assert_eq!(ann.attributes["city"], "Lisbon");
    assert_eq!(c.contact(ws, ann.id).await.expect("get"), Some(ann.clone()));
    let dup = c
        .create_contact(ws, &contact("+15550000001", &[]), now())
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    // The same phone in another workspace is another contact.
    c.create_contact(Uuid::new_v4(), &contact("+15550000001", &[]), now())
        .await
        .expect("other workspace");
    let bad = c.create_contact(ws, &contact("555-0001", &[]), now()).await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))));
    for n in 2..=5 {
        let labels: &[&str] = if n % 2 == 0 { &["vip"] } else { &[] };
        c.create_contact(ws, &contact(&format!("+1555000000{n}"), labels), now())
            .await
            .expect("create");
    }
    let vip = c.contacts(ws, Some("vip"), None, 100).await.expect("vip");
    assert_eq!(vip.len(), 3);
    assert!(vip.iter().all(|x| x.labels.contains(&"vip".to_owned())));
    let page1 = c.contacts(ws, None, None, 2).await.expect("p1");
    let page2 = c
        .contacts(ws, None, Some(page1[1].id), 10)
        .await
        .expect("p2");
    assert_eq!(page1.len() + page2.len(), 5);
    assert_eq!(c.contact_count(ws).await.expect("count"), 5);
}

async fn patch_and_delete_stay_in_the_workspace(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let other = Uuid::new_v4();
    let ann = c
        .create_contact(ws, &contact("+15550000011", &["a"]), now())
        .await
        .expect("create");
    let later = now() + chrono::Duration::seconds(5);
    let patch = ContactPatch {
        labels: Some(vec!["b".into(), "a".into()]),
        opted_out: Some(true),
        ..ContactPatch::default()
    };
    assert_eq!(
        c.update_contact(other, ann.id, &patch, later)
            .await
            .expect("foreign"),
        None
    );
    let p = c
        .update_contact(ws, ann.id, &patch, later)
        .await
        .expect("patch")
        .expect("found");
    assert_eq!(p.labels, ["a", "b"]);
    assert!(p.opted_out);
    assert_eq!(p.opted_out_at, Some(later));
    assert_eq!(p.name.as_deref(), Some("Ann"), "absent fields stay");
    assert_eq!(p.attributes, ann.attributes);
    let back = c
        .update_contact(
            ws,
            ann.id,
            &ContactPatch {
                opted_out: Some(false),
                name: Some("".into()),
                ..ContactPatch::default()
            },
            later,
        )
        .await
        .expect("patch")
        .expect("found");
    assert!(!back.opted_out, "an operator may resubscribe on request");
    assert_eq!(back.opted_out_at, None);
    assert_eq!(back.name, None, "an empty name clears it");
    assert!(!c.delete_contact(other, ann.id).await.expect("foreign"));
    assert!(c.delete_contact(ws, ann.id).await.expect("delete"));
    assert_eq!(c.contact(ws, ann.id).await.expect("get"), None);
}

async fn import_upserts_and_never_resubscribes(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let mut opted = contact("+15550000021", &["old"]);
    opted.opted_out = true;
    c.create_contact(ws, &opted, now()).await.expect("create");
    let rows: Vec<NewContact> = (0..12_000)
        .map(|n| {
            let mut x = contact(&format!("+1444{n:07}"), &["imported"]);
            x.attributes = json!({ "row": n }).as_object().cloned().expect("object");
            x.normalized().expect("valid")
        })
        .chain([
            // The opted-out contact again, as subscribed: stays opted out.
            NewContact {
                attributes: json!({ "plan": "gold" })
                    .as_object()
                    .cloned()
                    .expect("object"),
                ..contact("+15550000021", &["new"])
            }
            .normalized()
            .expect("valid"),
            // A phone twice in one import: the last wins.
            contact("+15559999999", &["first"])
                .normalized()
                .expect("valid"),
            contact("+15559999999", &["second"])
                .normalized()
                .expect("valid"),
        ])
        .collect();
    let counts = c.import_contacts(ws, &rows, now()).await.expect("import");
    assert_eq!(counts.stored, 12_002);
    assert_eq!(c.contact_count(ws).await.expect("count"), 12_002);
    let all = c.contacts(ws, Some("new"), None, 10).await.expect("list");
    assert_eq!(all.len(), 1);
    assert!(all[0].opted_out, "an import never resubscribes");
    assert_eq!(all[0].attributes["plan"], "gold");
    assert_eq!(all[0].attributes["city"], "Lisbon", "attributes merge");
    let twice = c
        .contacts(ws, Some("second"), None, 10)
        .await
        .expect("list");
    assert_eq!(twice.len(), 1);
    assert!(c
        .contacts(ws, Some("first"), None, 10)
        .await
        .expect("list")
        .is_empty());
    // Importing the same rows again changes nothing but the update time.
    let again = c.import_contacts(ws, &rows, now()).await.expect("again");
    assert_eq!(again.stored, 12_002);
    assert_eq!(c.contact_count(ws).await.expect("count"), 12_002);
}

async fn inbound_contacts_and_stop(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let sender = |name: Option<&str>, opt_out: bool| InboundContact {
        workspace_id: ws,
        identity: InboundIdentity::Phone("+15550000031".into()),
        name: name.map(str::to_owned),
        opt_out,
    };
    c.upsert_inbound_contacts(&[sender(Some("Bob"), false)], now())
        .await
        .expect("first message");
    c.upsert_inbound_contacts(&[sender(Some("Robert"), false), sender(None, false)], now())
        .await
        .expect("again");
    let list = c.contacts(ws, None, None, 10).await.expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name.as_deref(), Some("Bob"), "a known name is kept");
    assert!(!list[0].opted_out);
    // STOP and a later message in one batch: opted out.
    c.upsert_inbound_contacts(&[sender(None, true), sender(None, false)], now())
        .await
        .expect("stop");
    c.upsert_inbound_contacts(&[sender(None, false)], now())
        .await
        .expect("hello again");
    let list = c.contacts(ws, None, None, 10).await.expect("list");
    assert!(list[0].opted_out, "writing again does not undo STOP");
    assert_eq!(list[0].opted_out_at, Some(now()));
}

/// A Messenger or Instagram sender: known by a handle on the channel that received the message.
fn by_handle(
    ws: Uuid,
    channel_id: Uuid,
    platform: Platform,
    psid: &str,
    opt_out: bool,
) -> InboundContact {
    InboundContact {
        workspace_id: ws,
        identity: InboundIdentity::Handle {
            channel_id,
            platform,
            external_id: psid.into(),
        },
        name: None,
        opt_out,
    }
}

async fn messenger_senders_become_contacts_by_handle(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let page = Uuid::new_v4();
    let other_page = Uuid::new_v4();
    let insta = Uuid::new_v4();
    c.upsert_inbound_contacts(
        &[by_handle(ws, page, Platform::Messenger, "7001", false)],
        now(),
    )
    .await
    .expect("first message");
    let list = c.contacts(ws, None, None, 10).await.expect("list");
    assert_eq!(list.len(), 1);
    let first = list[0].clone();
    assert_eq!(first.phone, None, "a Messenger sender has no phone");
    assert_eq!(first.name, None, "Messenger webhooks carry no name");
    assert!(!first.opted_out);
    assert_eq!(
        first.handles,
        [ContactHandle {
            channel_id: page,
            platform: Platform::Messenger,
            external_id: "7001".into(),
        }]
    );
    assert_eq!(
        c.contact(ws, first.id).await.expect("get"),
        Some(first.clone()),
        "a single read has the handles too"
    );
    assert_eq!(
        c.contact(Uuid::new_v4(), first.id).await.expect("foreign"),
        None
    );

    // Another message from them (twice in one batch, and again later): nothing new.
    let later = now() + chrono::Duration::seconds(5);
    c.upsert_inbound_contacts(
        &[
            by_handle(ws, page, Platform::Messenger, "7001", false),
            by_handle(ws, page, Platform::Messenger, " 7001 ", false),
        ],
        later,
    )
    .await
    .expect("again");
    assert_eq!(c.contact_count(ws).await.expect("count"), 1);
    assert_eq!(
        c.contact(ws, first.id).await.expect("get"),
        Some(first.clone()),
        "a message that is not STOP changes nothing"
    );

    // STOP opts them out; writing again never resubscribes.
    c.upsert_inbound_contacts(
        &[by_handle(ws, page, Platform::Messenger, "7001", true)],
        later,
    )
    .await
    .expect("stop");
    c.upsert_inbound_contacts(
        &[by_handle(ws, page, Platform::Messenger, "7001", false)],
        later + chrono::Duration::seconds(5),
    )
    .await
    .expect("hello again");
    let stopped = c.contact(ws, first.id).await.expect("get").expect("exists");
    assert!(stopped.opted_out, "STOP opts a Messenger contact out");
    assert_eq!(stopped.opted_out_at, Some(later));
    assert_eq!(stopped.updated_at, later);
    assert_eq!(c.contact_count(ws).await.expect("count"), 1);

    // The same PSID on another page is another handle (PSIDs are page-scoped), so another
    // contact; a new sender who writes STOP first is created opted out; an Instagram sender and
    // a WhatsApp sender in the same call.
    c.upsert_inbound_contacts(
        &[
            by_handle(ws, other_page, Platform::Messenger, "7001", false),
            by_handle(ws, insta, Platform::Instagram, "17841400000000001", true),
            InboundContact {
                workspace_id: ws,
                identity: InboundIdentity::Phone("+15550000041".into()),
                name: Some("Wanda".into()),
                opt_out: false,
            },
        ],
        later,
    )
    .await
    .expect("more senders");
    let all = c.contacts(ws, None, None, 10).await.expect("list");
    assert_eq!(all.len(), 4, "{all:#?}");
    let handles: Vec<(Uuid, Platform, &str, bool)> = all
        .iter()
        .flat_map(|x| {
            x.handles.iter().map(|h| {
                (
                    h.channel_id,
                    h.platform,
                    h.external_id.as_str(),
                    x.opted_out,
                )
            })
        })
        .collect();
    for expected in [
        (page, Platform::Messenger, "7001", true),
        (other_page, Platform::Messenger, "7001", false),
        (insta, Platform::Instagram, "17841400000000001", true),
    ] {
        assert!(handles.contains(&expected), "{expected:?} in {handles:?}");
    }
    assert_eq!(handles.len(), 3, "one handle each");
    let wanda = all
        .iter()
        .find(|x| x.phone.as_deref() == Some("+15550000041"))
        .expect("the WhatsApp sender");
    assert!(wanda.handles.is_empty());
    assert_eq!(wanda.name.as_deref(), Some("Wanda"));
    // Pages of the list carry the handles too.
    let page1 = c.contacts(ws, None, None, 2).await.expect("p1");
    let page2 = c
        .contacts(ws, None, Some(page1[1].id), 10)
        .await
        .expect("p2");
    let paged: Vec<_> = page1.into_iter().chain(page2).collect();
    assert_eq!(paged, all);
    // A handle-only contact can be given a name and labels like any other.
    let named = c
        .update_contact(
            ws,
            first.id,
            &ContactPatch {
                name: Some("Pat".into()),
                labels: Some(vec!["messenger".into()]),
                ..ContactPatch::default()
            },
            later,
        )
        .await
        .expect("patch")
        .expect("found");
    assert_eq!(named.name.as_deref(), Some("Pat"));
    assert_eq!(
        named.handles, first.handles,
        "an update returns the handles"
    );
    let labelled = c
        .contacts(ws, Some("messenger"), None, 10)
        .await
        .expect("by label");
    assert_eq!(labelled, [named]);
}

/// Two webhook jobs meeting the same new sender at once create one contact between them, and
/// neither fails.
async fn racing_jobs_create_one_contact_per_new_handle(store: Arc<dyn Store>) {
    let ws = Uuid::new_v4();
    let page = Uuid::new_v4();
    const ROUNDS: usize = 20;
    const RACERS: usize = 4;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for racer in 0..RACERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // Each racer also carries a sender of its own, and one of them a STOP.
                let batch = [
                    by_handle(
                        ws,
                        page,
                        Platform::Messenger,
                        &format!("race-{round}"),
                        false,
                    ),
                    by_handle(
                        ws,
                        page,
                        Platform::Messenger,
                        &format!("own-{round}-{racer}"),
                        racer == 0,
                    ),
                ];
                store
                    .contacts()
                    .upsert_inbound_contacts(&batch, now())
                    .await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("no racer fails");
        }
    }
    let c = store.contacts();
    let expected = ROUNDS * (1 + RACERS);
    assert_eq!(
        c.contact_count(ws).await.expect("count"),
        expected as i64,
        "one contact per sender, however many jobs met them"
    );
    let all = c.contacts(ws, None, None, 1_000).await.expect("list");
    assert!(
        all.iter().all(|x| x.handles.len() == 1),
        "every contact has its handle, no orphan: {all:#?}"
    );
    let mut ids: Vec<&str> = all
        .iter()
        .map(|x| x.handles[0].external_id.as_str())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), expected);
    let stopped = all.iter().filter(|x| x.opted_out).count();
    assert_eq!(stopped, ROUNDS);
}

async fn deleting_a_contact_removes_its_handles(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let page = Uuid::new_v4();
    let insta = Uuid::new_v4();
    c.upsert_inbound_contacts(
        &[by_handle(ws, page, Platform::Messenger, "8001", true)],
        now(),
    )
    .await
    .expect("first");
    let first = c.contacts(ws, None, None, 10).await.expect("list")[0].clone();
    assert!(first.opted_out);
    assert!(!c
        .delete_contact(Uuid::new_v4(), first.id)
        .await
        .expect("foreign"));
    assert!(c.delete_contact(ws, first.id).await.expect("delete"));
    assert_eq!(c.contact(ws, first.id).await.expect("get"), None);
    // The handle went with the contact: the sender writing again is a new contact (had the
    // handle stayed, it would name a contact that is gone and nothing would be created).
    c.upsert_inbound_contacts(
        &[
            by_handle(ws, page, Platform::Messenger, "8001", false),
            by_handle(ws, insta, Platform::Instagram, "8001", false),
        ],
        now(),
    )
    .await
    .expect("again");
    let again = c.contacts(ws, None, None, 10).await.expect("list");
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|x| x.id != first.id));
    assert!(
        again.iter().all(|x| !x.opted_out),
        "a deleted contact's opt-out went with it"
    );
    // Deleting one contact leaves the other's handle alone.
    let messenger = again
        .iter()
        .find(|x| x.handles[0].platform == Platform::Messenger)
        .expect("messenger contact");
    assert!(c.delete_contact(ws, messenger.id).await.expect("delete"));
    let left = c.contacts(ws, None, None, 10).await.expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].handles[0].platform, Platform::Instagram);
}

/// A WhatsApp handle, or an external id that cannot be one, fails the call before anything
/// is written.
async fn handles_are_checked_before_anything_is_written(store: Arc<dyn Store>) {
    let c = store.contacts();
    let ws = Uuid::new_v4();
    let page = Uuid::new_v4();
    for bad in [
        by_handle(ws, page, Platform::Whatsapp, "15550000051", false),
        by_handle(ws, page, Platform::Messenger, "  ", false),
        by_handle(ws, page, Platform::Messenger, "a\0b", false),
        by_handle(ws, page, Platform::Messenger, &"9".repeat(300), false),
    ] {
        let batch = [
            by_handle(ws, page, Platform::Messenger, "9001", false),
            bad.clone(),
        ];
        let result = c.upsert_inbound_contacts(&batch, now()).await;
        assert!(
            matches!(result, Err(StoreError::Invalid(_))),
            "{bad:?}: {result:?}"
        );
    }
    assert_eq!(c.contact_count(ws).await.expect("count"), 0);
    c.upsert_inbound_contacts(&[], now()).await.expect("empty");
}

/// Contacts stored before migration 0008 (phone NOT NULL; on SQLite the table is rebuilt) are
/// all still there after it, and read as before.
mod before_handles {
    use std::str::FromStr;

    use herald_engine::contacts::{ContactStore, NewContact};
    use herald_engine::migrate::Migration;
    use herald_engine::StoreError;
    use sqlx::{Connection, Executor};
    use uuid::Uuid;

    use super::{common, now};

    /// Migrations before 0008.
    fn before(set: &'static [Migration]) -> impl Iterator<Item = &'static Migration> {
        set.iter().filter(|m| m.version < 8)
    }

    async fn check(c: &dyn ContactStore, ws: Uuid, ann: Uuid, bob: Uuid) {
        let a = c.contact(ws, ann).await.expect("get").expect("Ann kept");
        assert_eq!(a.phone.as_deref(), Some("+15550000061"));
        assert_eq!(a.name.as_deref(), Some("Ann"));
        assert_eq!(a.labels, ["beta", "vip"]);
        assert_eq!(a.attributes["city"], "Lisbon");
        assert!(!a.opted_out);
        assert!(a.handles.is_empty());
        assert_eq!(a.created_at, now());
        let b = c.contact(ws, bob).await.expect("get").expect("Bob kept");
        assert_eq!(b.phone.as_deref(), Some("+15550000062"));
        assert!(b.opted_out);
        assert_eq!(b.opted_out_at, Some(now()));
        assert_eq!(c.contact_count(ws).await.expect("count"), 2);
        let vip = c.contacts(ws, Some("vip"), None, 10).await.expect("label");
        assert_eq!(vip.len(), 1);
        // The phone is still unique in the workspace, and a phone is still required of a
        // contact created through the API.
        let dup = c
            .create_contact(
                ws,
                &NewContact {
                    phone: "+15550000061".into(),
                    name: None,
                    labels: vec![],
                    attributes: Default::default(),
                    opted_out: false,
                },
                now(),
            )
            .await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        // And a contact without a phone can now exist.
        c.upsert_inbound_contacts(
            &[super::by_handle(
                ws,
                Uuid::new_v4(),
                herald_engine::delivery::Platform::Messenger,
                "7777",
                false,
            )],
            now(),
        )
        .await
        .expect("handle");
        assert_eq!(c.contact_count(ws).await.expect("count"), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let path = common::sqlite_path();
        let _leftovers = common::Dropped::File(path.clone());
        let url = format!("sqlite:{}", path.display());
        let (ws, ann, bob) = (Uuid::new_v4(), Uuid::now_v7(), Uuid::now_v7());
        {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                .expect("url")
                .create_if_missing(true)
                .foreign_keys(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("open");
            conn.execute(
                "CREATE TABLE herald_migrations (
                    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
            )
            .await
            .expect("bookkeeping");
            for m in before(herald_engine::migrate::SQLITE) {
                conn.execute(m.sql).await.expect("old migration");
                sqlx::query(
                    "INSERT INTO herald_migrations (version, name, applied_at) VALUES (?1, ?2, 0)",
                )
                .bind(m.version)
                .bind(m.name)
                .execute(&mut conn)
                .await
                .expect("record");
            }
            let at = now().timestamp_micros();
            sqlx::query(
                "INSERT INTO herald_contacts (id, workspace_id, phone, name, labels, attributes,
                                              opted_out, opted_out_at, created_at, updated_at)
                 VALUES (?1, ?3, '+15550000061', 'Ann', '[\"beta\",\"vip\"]',
                         '{\"city\":\"Lisbon\"}', 0, NULL, ?4, ?4),
                        (?2, ?3, '+15550000062', NULL, '[]', '{}', 1, ?4, ?4, ?4)",
            )
            .bind(ann.to_string())
            .bind(bob.to_string())
            .bind(ws.to_string())
            .bind(at)
            .execute(&mut conn)
            .await
            .expect("old contacts");
            conn.close().await.expect("close");
        }
        let store = common::sqlite_at(&path).await;
        check(&store, ws, ann, bob).await;
        // The rebuilt table kept its index, and the old one is gone.
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE tbl_name LIKE 'herald_contacts%' ORDER BY name",
        )
        .fetch_all(store.pool())
        .await
        .expect("schema");
        assert!(
            names.contains(&"herald_contacts_page".to_owned()),
            "{names:?}"
        );
        assert!(
            !names.contains(&"herald_contacts_new".to_owned()),
            "{names:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let schema = common::unique_name("t");
        let _leftovers = common::Dropped::Schema(schema.clone());
        let (ws, ann, bob) = (Uuid::new_v4(), Uuid::now_v7(), Uuid::now_v7());
        {
            let options = sqlx::postgres::PgConnectOptions::from_str(&common::pg_url())
                .expect("url")
                .options([("search_path", schema.as_str())]);
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .expect("connect to PostgreSQL");
            conn.execute(format!("CREATE SCHEMA {schema}").as_str())
                .await
                .expect("schema");
            conn.execute(
                "CREATE TABLE herald_migrations (
                    version bigint PRIMARY KEY, name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .expect("bookkeeping");
            for m in before(herald_engine::migrate::POSTGRES) {
                conn.execute(m.sql).await.expect("old migration");
                sqlx::query("INSERT INTO herald_migrations (version, name) VALUES ($1, $2)")
                    .bind(m.version)
                    .bind(m.name)
                    .execute(&mut conn)
                    .await
                    .expect("record");
            }
            sqlx::query(
                "INSERT INTO herald_contacts (id, workspace_id, phone, name, labels, attributes,
                                              opted_out, opted_out_at, created_at, updated_at)
                 VALUES ($1, $3, '+15550000061', 'Ann', '{beta,vip}', '{\"city\":\"Lisbon\"}',
                         false, NULL, $4, $4),
                        ($2, $3, '+15550000062', NULL, '{}', '{}', true, $4, $4, $4)",
            )
            .bind(ann)
            .bind(bob)
            .bind(ws)
            .bind(now())
            .execute(&mut conn)
            .await
            .expect("old contacts");
            conn.close().await.expect("close");
        }
        let store = common::pg_store_in(&schema).await;
        check(&store, ws, ann, bob).await;
    }
}
