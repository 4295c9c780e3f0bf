//! libFuzzer target for Meta's webhook parser, `herald_workers::meta::webhook::parse`.
//!
//! The same invariants as the property tests in `workers/tests/webhook_parser.rs`: any body
//! gives `Ok` or `Err`, never a panic, and never an event for a channel the resolver did not
//! name. Here the resolver knows two numbers/pages ("1555", the channel whose URL was called,
//! and "1556", a sibling channel of the same app) and records what it answered, so the check is
//! exact: every event's (channel, workspace) is a pair the resolver returned during this call,
//! and every id reported as foreign is one it refused.
//!
//! Run from the repository root (see README.md):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run webhook_parse fuzz/corpus/webhook_parse fuzz/seeds/webhook_parse -- -max_total_time=600`

#![no_main]

use std::cell::RefCell;
use std::sync::OnceLock;

use chrono::Utc;
use herald_engine::delivery::{Channel, ChannelLimits, Platform};
use herald_workers::meta::webhook::parse;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const OWN: &str = "1555";
const SIBLING: &str = "1556";

fn own() -> (Uuid, Uuid) {
    (Uuid::from_u128(1), Uuid::from_u128(2))
}

fn sibling() -> (Uuid, Uuid) {
    (Uuid::from_u128(3), Uuid::from_u128(4))
}

fn channel() -> &'static Channel {
    static CHANNEL: OnceLock<Channel> = OnceLock::new();
    CHANNEL.get_or_init(|| Channel {
        id: own().0,
        workspace_id: own().1,
        platform: Platform::Whatsapp,
        name: "c".into(),
        sender_id: OWN.into(),
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
    })
}

fuzz_target!(|body: &[u8]| {
    // What the resolver answered during this call: (sender, answer).
    let answers: RefCell<Vec<(String, Option<(Uuid, Uuid)>)>> = RefCell::new(Vec::new());
    let resolve = |sender: &str| {
        let answer = match sender {
            OWN => Some(own()),
            SIBLING => Some(sibling()),
            _ => None,
        };
        answers.borrow_mut().push((sender.to_owned(), answer));
        answer
    };
    let Ok(events) = parse(channel(), body, chrono::DateTime::UNIX_EPOCH, &resolve) else {
        return;
    };
    let answers = answers.into_inner();
    let named: Vec<(Uuid, Uuid)> = answers.iter().filter_map(|(_, a)| *a).collect();
    for s in &events.statuses {
        assert!(
            named.iter().any(|(c, _)| *c == s.channel_id),
            "status routed to channel {} that the resolver did not name ({answers:?})",
            s.channel_id
        );
    }
    for m in &events.inbound {
        assert!(
            named.contains(&(m.channel_id, m.workspace_id)),
            "inbound message routed to channel {} / workspace {} that the resolver did not name ({answers:?})",
            m.channel_id,
            m.workspace_id
        );
    }
    // Foreign: an id the resolver refused, or one that is not a string at all (Meta sends
    // strings), which is never asked about and never given to the called channel.
    for f in &events.foreign {
        let not_a_string = f.starts_with(herald_workers::meta::webhook::NOT_A_STRING);
        assert!(
            not_a_string || answers.iter().any(|(s, a)| s == f && a.is_none()),
            "{f:?} reported foreign but the resolver did not refuse it ({answers:?})"
        );
    }
});
