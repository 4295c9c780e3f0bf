//! The webhook parser against hostile input: any bytes, and Meta-shaped JSON with every value
//! replaced by random ones, must give `Ok` or `Err`, never a panic, and never an event for a
//! channel the resolver did not name. These run in every test run; the libFuzzer target in
//! `fuzz/` checks the same properties for longer (see README.md).

use chrono::Utc;
use herald_engine::delivery::{Channel, ChannelLimits, Platform};
use herald_workers::meta::webhook::{parse, whatsapp_statuses, Quick};
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

/// When the deliveries here arrived: the time of events without a usable one.
fn received() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_767_000_000, 0).expect("a time")
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
        Just(json!("a\u{0}b")),
        Just(json!("-200000000000")),
        Just(json!(-200_000_000_000_000i64)),
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

/// What the parser gives out can be stored: PostgreSQL refuses U+0000 in text and jsonb, and
/// times before 4713 BC.
fn storable(s: &str) {
    assert!(!s.contains('\0'), "a NUL reached the store: {s:?}");
}

fn storable_time(t: chrono::DateTime<chrono::Utc>) {
    assert!(
        (1970..=9999).contains(&chrono::Datelike::year(&t)),
        "a time PostgreSQL may refuse: {t}"
    );
}

fn check(events: &herald_workers::meta::webhook::Events) {
    for s in &events.statuses {
        assert_eq!(s.channel_id, Uuid::from_u128(1));
        storable(&s.provider_message_id);
        if let Some(e) = &s.error {
            storable(e);
        }
        storable_time(s.at);
    }
    for m in &events.inbound {
        assert_eq!(m.channel_id, Uuid::from_u128(1));
        assert_eq!(m.workspace_id, Uuid::from_u128(2));
        for text in [Some(&m.provider_message_id), Some(&m.sender), Some(&m.kind)]
            .into_iter()
            .chain([m.text.as_ref(), m.profile_name.as_ref()])
            .flatten()
        {
            storable(text);
        }
        let payload = m.payload.to_string();
        assert!(
            !payload.contains("\\u0000"),
            "a NUL in the payload: {payload}"
        );
        storable_time(m.sent_at);
    }
}

/// A field of a generated status: mostly what Meta sends, sometimes anything.
fn field(usual: Vec<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        30 => prop::sample::select(usual).prop_map(Some),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => any_json().prop_map(Some),
        1 => prop::sample::select(vec![
            json!("wamid.\u{0}C"),
            json!("-200000000000"),
            json!(1767225600),
            json!("sent"),
            json!(["1556"]),
            json!(["wamid.A", "delivered", "1767225600", "00000000-0000-0000-0000-00000000000a"]),
        ])
        .prop_map(Some),
    ]
}

/// A WhatsApp delivery close to Meta's: statuses of our sends, with every field sometimes
/// missing, null, of another type or hostile, and sometimes messages or errors beside them.
fn whatsapp_delivery() -> impl Strategy<Value = Value> {
    let status = (
        field(vec![json!("wamid.A"), json!("wamid.B")]),
        field(vec![
            json!("sent"),
            json!("delivered"),
            json!("read"),
            json!("failed"),
            json!("deleted"),
        ]),
        field(vec![
            json!("1767225600"),
            json!("-200000000000"),
            json!(1767225600),
        ]),
        field(vec![
            json!("00000000-0000-0000-0000-00000000000a"),
            json!("00000000-0000-0000-0000-00000000000b"),
            json!("not a send id"),
        ]),
        prop::option::weighted(0.05, any_json()),
    )
        .prop_map(|(id, status, timestamp, callback, errors)| {
            let mut s = serde_json::Map::new();
            for (k, v) in [
                ("id", id),
                ("status", status),
                ("timestamp", timestamp),
                ("biz_opaque_callback_data", callback),
                ("errors", errors),
            ] {
                if let Some(v) = v {
                    s.insert(k.to_owned(), v);
                }
            }
            s.insert("recipient_id".to_owned(), json!("15550001"));
            Value::Object(s)
        });
    let value = (
        field(vec![
            json!({ "phone_number_id": "1555" }),
            json!({ "phone_number_id": "1556" }),
            json!({ "phone_number_id": null }),
            json!({}),
        ]),
        prop::collection::vec(
            prop_oneof![
                12 => status,
                1 => Just(json!(["wamid.A", "delivered", "1767225600",
                                 "00000000-0000-0000-0000-00000000000a"])),
            ],
            0..=2,
        ),
        prop::option::weighted(0.05, any_json()),
    )
        .prop_map(|(metadata, statuses, messages)| {
            let mut v = serde_json::Map::new();
            v.insert("messaging_product".to_owned(), json!("whatsapp"));
            if let Some(m) = metadata {
                v.insert("metadata".to_owned(), m);
            }
            v.insert("statuses".to_owned(), Value::Array(statuses));
            if let Some(m) = messages {
                v.insert("messages".to_owned(), m);
            }
            Value::Object(v)
        });
    prop::collection::vec(prop::collection::vec(value, 0..3), 1..=2).prop_map(|entries| {
        json!({
            "object": "whatsapp_business_account",
            "entry": entries.into_iter().map(|changes| json!({
                "id": "waba",
                "changes": changes.into_iter().map(|v| json!({ "field": "messages", "value": v }))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    })
}

/// The ingest's quick reading must agree with the full parser whenever it answers: the same
/// statuses, nothing else in the delivery, every status carrying our send id.
fn quick_agrees(body: &[u8]) -> Option<bool> {
    // Two known numbers, so that a status given to the wrong one shows.
    let resolve = |sender: &str| match sender {
        "1555" => Some((Uuid::from_u128(1), Uuid::from_u128(2))),
        "1556" => Some((Uuid::from_u128(3), Uuid::from_u128(2))),
        _ => None,
    };
    let full = parse(&channel(), body, received(), &resolve);
    let statuses_only = full.as_ref().ok().filter(|e| {
        e.inbound.is_empty()
            && e.foreign.is_empty()
            && !e.statuses.is_empty()
            && e.statuses.iter().all(|s| s.send_id.is_some())
    });
    match whatsapp_statuses(&channel(), body, received(), &resolve) {
        Quick::Unsure => None,
        // Always safe: the job applies whatever the delivery holds. (A `messages` field that
        // holds no message is Other here and statuses only to the full parser.)
        Quick::Other => Some(false),
        Quick::Statuses(quick) => {
            let full = statuses_only.expect("quick found statuses only, so must the full parse");
            assert_eq!(quick.len(), full.statuses.len());
            for (q, f) in quick.iter().zip(&full.statuses) {
                assert_eq!(q, f);
            }
            Some(true)
        }
    }
}

/// Bodies a typed reading is laxer with than a `serde_json::Value` (found by review): arrays
/// where objects belong, and in fields it skips: a lone surrogate, a number no f64 holds,
/// invalid UTF-8, nesting past serde_json's limit. None may be read as statuses.
#[test]
fn what_the_full_parser_refuses_is_never_read_quickly() {
    let status = r#"{"id":"wamid.A","status":"delivered","timestamp":"1767225600","biz_opaque_callback_data":"00000000-0000-0000-0000-00000000000a"}"#;
    let wrap = |value: &str| {
        format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"w","changes":[{{"field":"messages","value":{value}}}]}}]}}"#
        )
    };
    let good = wrap(&format!(
        r#"{{"metadata":{{"phone_number_id":"1555"}},"statuses":[{status}]}}"#
    ));
    assert_eq!(
        quick_agrees(good.as_bytes()),
        Some(true),
        "the plain case is quick"
    );
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let mut invalid_utf8 = wrap(&format!(r#"{{"statuses":[{status}],"x":"abc"}}"#)).into_bytes();
    let at = invalid_utf8
        .windows(3)
        .position(|w| w == b"abc")
        .expect("the string")
        + 1;
    invalid_utf8[at] = 0xff;
    let bodies: Vec<Vec<u8>> = vec![
        wrap(r#"{"statuses":[["wamid.A","delivered","1767225600","00000000-0000-0000-0000-00000000000a"]]}"#).into_bytes(),
        wrap(&format!(r#"{{"metadata":["1556"],"statuses":[{status}]}}"#)).into_bytes(),
        wrap(&format!(r#"[null,[{status}]]"#)).into_bytes(),
        br#"["whatsapp_business_account",[]]"#.to_vec(),
        wrap(&format!(r#"{{"statuses":[{status}],"x":"\udc00"}}"#)).into_bytes(),
        wrap(&format!(r#"{{"statuses":[{status}],"x":1e400}}"#)).into_bytes(),
        wrap(&format!(r#"{{"statuses":[{status}],"x":{}}}"#, "9".repeat(400))).into_bytes(),
        wrap(&format!(r#"{{"statuses":[{status}],"x":{deep}}}"#)).into_bytes(),
        wrap(&format!(r#"{{"statuses":[{status}],"x":"a\u0000b"}}"#)).into_bytes(),
        invalid_utf8,
    ];
    for body in bodies {
        assert_ne!(
            quick_agrees(&body),
            Some(true),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// The generator reaches every answer of the quick reading, so the property above is not
/// vacuous.
#[test]
fn the_quick_reading_is_exercised_on_every_answer() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = whatsapp_delivery();
    let (mut statuses, mut other, mut unsure) = (0, 0, 0);
    for _ in 0..2_000 {
        let body = serde_json::to_vec(&strategy.new_tree(&mut runner).expect("tree").current())
            .expect("json");
        match quick_agrees(&body) {
            Some(true) => statuses += 1,
            Some(false) => other += 1,
            None => unsure += 1,
        }
    }
    assert!(
        statuses > 100 && other > 100 && unsure > 20,
        "{statuses} / {other} / {unsure}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn the_quick_reading_agrees_with_the_parser(body in whatsapp_delivery()) {
        quick_agrees(&serde_json::to_vec(&body).expect("json"));
    }

    #[test]
    fn the_quick_reading_of_any_bytes_agrees(body in prop::collection::vec(any::<u8>(), 0..512)) {
        quick_agrees(&body);
    }

    #[test]
    fn any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(events) = parse(&channel(), &body, received(), &resolve) {
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
        if let Ok(events) = parse(&channel(), &body, received(), &resolve) {
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
            received(),
            &resolve,
        )
        .expect("parses");
        assert!(events.inbound.is_empty(), "{events:?}");
        assert_eq!(events.foreign, ["not a string: 1556"]);
    }
}

/// A signed delivery with a NUL in its strings or a time before 4713 BC parsed into events that
/// PostgreSQL refuses to store, so the job retried until discarded, taking the other deliveries
/// of its batch with it. Now the NULs are dropped and such a time counts as absent.
#[test]
fn what_postgresql_cannot_store_is_cleaned_out() {
    let body = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "waba", "changes": [{ "field": "messages", "value": {
            "metadata": { "phone_number_id": "1555" },
            "statuses": [
                { "id": "wamid.\u{0}1", "status": "failed", "timestamp": "-200000000000",
                  "recipient_id": "1", "errors": [{ "code": 1, "title": "bad\u{0}title" }] }
            ],
            "contacts": [{ "wa_id": "15551234567", "profile": { "name": "A\u{0}nn" } }],
            "messages": [
                { "from": "15551234567", "id": "wamid.\u{0}2", "timestamp": "1767225600",
                  "type": "text", "text": { "body": "hi\u{0}there" }, "x\u{0}": "\u{0}" }
            ]
        }}]}]
    }))
    .expect("json");
    let events = parse(&channel(), &body, received(), &resolve).expect("parses");
    check(&events);
    assert_eq!(events.statuses.len(), 1);
    assert_eq!(events.statuses[0].provider_message_id, "wamid.1");
    assert_eq!(events.statuses[0].error.as_deref(), Some("badtitle"));
    assert_eq!(events.inbound.len(), 1);
    assert_eq!(events.inbound[0].text.as_deref(), Some("hithere"));
    assert_eq!(events.inbound[0].profile_name.as_deref(), Some("Ann"));
}

/// A WhatsApp message without a usable time (missing, not a number, past year 9999, negative)
/// was dropped: the user's message was lost. It is kept with the time its delivery arrived.
#[test]
fn a_message_without_a_usable_time_is_kept() {
    let message = |id: &str, timestamp: Option<Value>| {
        let mut m = json!({ "from": "15551234567", "id": id, "type": "text",
                            "text": { "body": "hello" } });
        if let Some(t) = timestamp {
            m["timestamp"] = t;
        }
        m
    };
    let body = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "waba", "changes": [{ "field": "messages", "value": {
            "metadata": { "phone_number_id": "1555" },
            "messages": [
                message("wamid.none", None),
                message("wamid.text", Some(json!("soon"))),
                message("wamid.number", Some(json!(1767225600))),
                message("wamid.far", Some(json!("99999999999999"))),
                message("wamid.negative", Some(json!("-5"))),
                message("wamid.good", Some(json!("1767225600"))),
            ]
        }}]}]
    }))
    .expect("json");
    let events = parse(&channel(), &body, received(), &resolve).expect("parses");
    check(&events);
    let ids: Vec<&str> = events
        .inbound
        .iter()
        .map(|m| m.provider_message_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "wamid.none",
            "wamid.text",
            "wamid.number",
            "wamid.far",
            "wamid.negative",
            "wamid.good"
        ]
    );
    for m in &events.inbound[..5] {
        assert_eq!(m.sent_at, received(), "{}", m.provider_message_id);
        assert_eq!(m.text.as_deref(), Some("hello"));
    }
    assert_eq!(events.inbound[5].sent_at.timestamp(), 1_767_225_600);
}
