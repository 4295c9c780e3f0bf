//! The webhook parser against hostile input: any bytes, and Meta-shaped JSON with every value
//! replaced by random ones, must give `Ok` or `Err`, never a panic, and never an event for a
//! channel the resolver did not name. These run in every test run; the libFuzzer target in
//! `fuzz/` checks the same properties for longer (see README.md).

use chrono::Utc;
use herald_engine::delivery::{Channel, ChannelLimits, Platform};
use herald_workers::meta::webhook::parse;
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

fn channel() -> Channel {
    Channel {
        id: Uuid::from_u128(1),
        workspace_id: Uuid::from_u128(2),
        platform: Platform::Whatsapp,
        name: "c".into(),
        sender_id: "1555".into(),
        portfolio_id: None,
        access_token: String::new(),
        app_secret: String::new(),
        verify_token: String::new(),
        graph_base_url: String::new(),
        api_version: String::new(),
        limits: ChannelLimits::default(),
        paused_reason: None,
        paused_broadcasts_only: false,
        paused_at: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

fn resolve(sender: &str) -> Option<(Uuid, Uuid)> {
    (sender == "1555").then_some((Uuid::from_u128(1), Uuid::from_u128(2)))
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        Just(json!("1555")),
        Just(json!("1767225600")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("object".to_owned()),
                    Just("entry".to_owned()),
                    Just("changes".to_owned()),
                    Just("value".to_owned()),
                    Just("messages".to_owned()),
                    Just("statuses".to_owned()),
                    Just("messaging".to_owned()),
                    Just("metadata".to_owned()),
                    Just("phone_number_id".to_owned()),
                    Just("id".to_owned()),
                    Just("from".to_owned()),
                    Just("timestamp".to_owned()),
                    Just("status".to_owned()),
                    Just("message".to_owned()),
                    Just("sender".to_owned()),
                    Just("delivery".to_owned()),
                    Just("mids".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check(events: &herald_workers::meta::webhook::Events) {
    for s in &events.statuses {
        assert_eq!(s.channel_id, Uuid::from_u128(1));
    }
    for m in &events.inbound {
        assert_eq!(m.channel_id, Uuid::from_u128(1));
        assert_eq!(m.workspace_id, Uuid::from_u128(2));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(events) = parse(&channel(), &body, &resolve) {
            check(&events);
        }
    }

    #[test]
    fn meta_shaped_json_never_panics(
        object in prop_oneof![
            Just("whatsapp_business_account"), Just("page"), Just("instagram"), Just("other")
        ],
        entry in prop::collection::vec(any_json(), 0..4),
    ) {
        let body = serde_json::to_vec(&json!({ "object": object, "entry": entry }))
            .expect("json");
        if let Ok(events) = parse(&channel(), &body, &resolve) {
            check(&events);
        }
    }
}

/// Found by the fuzz target: an id that is not a string (Meta sends strings) named no known
/// channel, yet its events went to the channel whose URL was called. They are foreign now.
#[test]
fn a_non_string_meta_id_is_foreign_not_the_called_channel() {
    let wa = json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "w", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "phone_number_id": 1556 },
            "messages": [{ "from": "15550001", "id": "wamid.X", "timestamp": "1700000000",
                           "type": "text", "text": { "body": "hi" } }]
        }}]}]
    });
    let page = json!({
        "object": "page",
        "entry": [{ "id": 1556, "time": 1, "messaging": [{
            "sender": { "id": "psid" }, "recipient": { "id": "1556" }, "timestamp": 1,
            "message": { "mid": "m.1", "text": "hi" }
        }]}]
    });
    for body in [wa, page] {
        let events = parse(
            &channel(),
            &serde_json::to_vec(&body).expect("json"),
            &resolve,
        )
        .expect("parses");
        assert!(events.inbound.is_empty(), "{events:?}");
        assert_eq!(events.foreign, ["not a string: 1556"]);
    }
}
