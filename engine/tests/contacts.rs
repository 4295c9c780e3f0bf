//! Contacts, conformance on both backends: create, conflicts, labels, patch, opt-out rules,
//! import upserts, workspace scoping.

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald_engine::contacts::{ContactPatch, InboundContact, NewContact};
use herald_engine::{Store, StoreError};
use serde_json::json;
use uuid::Uuid;

conformance!(
    create_read_list_by_label,
    patch_and_delete_stay_in_the_workspace,
    import_upserts_and_never_resubscribes,
    inbound_contacts_and_stop,
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
    assert_eq!(ann.phone, "+15550000001");
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
        phone: "+15550000031".into(),
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
