//! WhatsApp template references, conformance on both backends.

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use herald_engine::delivery::Message;
use herald_engine::templates::{
    NewTemplate, TemplateCategory, TemplateParameter, TemplatePatch, TemplateValues,
};
use herald_engine::{Store, StoreError};
use uuid::Uuid;

conformance!(templates_round_trip_and_stay_in_their_workspace);

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("time")
}

fn param(name: &str) -> TemplateParameter {
    TemplateParameter {
        name: name.into(),
        example: Some("Ana".into()),
    }
}

async fn templates_round_trip_and_stay_in_their_workspace(store: Arc<dyn Store>) {
    let t = store.templates();
    let (ws, other) = (Uuid::new_v4(), Uuid::new_v4());
    let new = NewTemplate {
        name: "order_update".into(),
        language: "en_US".into(),
        category: TemplateCategory::Utility,
        parameters: vec![param("first_name"), param("order_id")],
    };
    let a = t.create_template(ws, &new, now()).await.expect("create");
    assert_eq!(
        (a.name.as_str(), a.language.as_str(), a.category),
        ("order_update", "en_US", TemplateCategory::Utility)
    );
    assert_eq!(a.parameters, new.parameters);
    assert_eq!((a.created_at, a.updated_at), (now(), now()));
    assert_eq!(t.template(ws, a.id).await.expect("get"), Some(a.clone()));
    assert_eq!(
        t.template_named(ws, "order_update", "en_US")
            .await
            .expect("named"),
        Some(a.clone())
    );
    // The same name and language twice is a conflict; another language is another template.
    assert!(matches!(
        t.create_template(ws, &new, now()).await,
        Err(StoreError::Conflict(_))
    ));
    let pt = t
        .create_template(
            ws,
            &NewTemplate {
                language: "pt_BR".into(),
                ..new.clone()
            },
            now(),
        )
        .await
        .expect("pt_BR");
    // Another workspace sees nothing and changes nothing.
    assert_eq!(t.template(other, a.id).await.expect("get"), None);
    assert!(t.templates(other, None, 10).await.expect("list").is_empty());
    assert!(!t.delete_template(other, a.id).await.expect("delete"));
    assert_eq!(
        t.update_template(other, a.id, &TemplatePatch::default(), now())
            .await
            .expect("update"),
        None
    );
    // Bad input is refused, nothing written.
    for bad in [
        NewTemplate {
            name: "Order Update".into(),
            ..new.clone()
        },
        NewTemplate {
            language: "english".into(),
            ..new.clone()
        },
        NewTemplate {
            name: "dup_params".into(),
            parameters: vec![param("a"), param("a")],
            ..new.clone()
        },
    ] {
        assert!(matches!(
            t.create_template(ws, &bad, now()).await,
            Err(StoreError::Invalid(_))
        ));
    }
    // Pages in id order.
    let first = t.templates(ws, None, 1).await.expect("page");
    assert_eq!(first, vec![a.clone()]);
    assert_eq!(
        t.templates(ws, Some(a.id), 10).await.expect("page"),
        vec![pt.clone()]
    );
    // Update: parameters replaced, category changed, identity kept.
    let later = now() + chrono::Duration::seconds(5);
    let b = t
        .update_template(
            ws,
            a.id,
            &TemplatePatch {
                category: Some(TemplateCategory::Marketing),
                parameters: Some(vec![param("first_name")]),
            },
            later,
        )
        .await
        .expect("update")
        .expect("found");
    assert_eq!(b.category, TemplateCategory::Marketing);
    assert_eq!(b.parameters, vec![param("first_name")]);
    assert_eq!((b.name.as_str(), b.updated_at), ("order_update", later));
    assert!(matches!(
        t.update_template(
            ws,
            a.id,
            &TemplatePatch {
                parameters: Some(vec![param("Bad Name")]),
                ..TemplatePatch::default()
            },
            later
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    // What a campaign or flow sends with it.
    let values: TemplateValues = [("first_name".to_string(), "Ana".to_string())].into();
    assert_eq!(
        b.message(&values).expect("message"),
        Message::Template {
            name: "order_update".into(),
            language: "en_US".into(),
            parameters: vec!["Ana".into()],
        }
    );
    assert!(t.delete_template(ws, a.id).await.expect("delete"));
    assert!(!t.delete_template(ws, a.id).await.expect("delete"));
    assert_eq!(t.templates(ws, None, 10).await.expect("list"), vec![pt]);
}
