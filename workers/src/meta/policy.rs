//! What to do with each of Meta's error codes: the table in `shared/domain/meta-platform.md`,
//! as code. Branch on `error.code`, never on the HTTP status (Meta answers most errors 400).

use std::time::Duration;

/// What a failed send leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A temporary problem on Meta's side: retry with the kind's exponential backoff (counts an
    /// attempt).
    Retry,
    /// The channel's throughput (130429) or a Graph API budget (4, 17, 32, 613, 80007) is
    /// exhausted: slow the channel and try again after this (not counted as an attempt).
    SlowChannel { retry_after: Duration },
    /// The pair rate to this one user (131056): retry only this recipient after 4^n seconds,
    /// keep sending to everyone else.
    RetryRecipient,
    /// Not a failure of this message: wait this long (throughput upgrade, per-user marketing
    /// cap).
    Wait { retry_after: Duration },
    /// Nothing will succeed on this channel until a person acts (token, policy block, spam
    /// quality): pause it with this reason; only its broadcasts for spam quality (replies to
    /// people who wrote in still go).
    PauseChannel {
        reason: &'static str,
        broadcasts_only: bool,
    },
    /// This message to this recipient will never succeed.
    Permanent {
        reason: &'static str,
        /// The user asked not to get marketing messages: record an opt-out.
        opt_out: bool,
    },
}

/// One row of the policy table.
pub struct Row {
    pub codes: &'static [i64],
    pub meaning: &'static str,
    pub action: fn() -> Action,
}

/// Meta's error codes and Herald's answer to each. Codes not listed are treated by
/// [`classify`]'s fallback rules.
pub const TABLE: &[Row] = &[
    Row {
        codes: &[130429],
        meaning: "throughput limit",
        action: || Action::SlowChannel {
            retry_after: Duration::from_secs(1),
        },
    },
    Row {
        codes: &[131056],
        meaning: "pair rate limit",
        action: || Action::RetryRecipient,
    },
    Row {
        codes: &[131057],
        meaning: "throughput upgrade in progress",
        action: || Action::Wait {
            retry_after: Duration::from_secs(60),
        },
    },
    Row {
        codes: &[4, 17, 32, 613, 80007],
        meaning: "Graph API rate limit",
        action: || Action::SlowChannel {
            retry_after: Duration::from_secs(60),
        },
    },
    Row {
        codes: &[1, 2, 131016, 131000],
        meaning: "temporary server error",
        action: || Action::Retry,
    },
    Row {
        codes: &[131048],
        meaning: "spam rate limit (quality)",
        action: || Action::PauseChannel {
            reason: "Meta limited the number for spam (131048): broadcasts paused",
            broadcasts_only: true,
        },
    },
    Row {
        codes: &[131049],
        meaning: "per-user marketing cap",
        action: || Action::Wait {
            retry_after: Duration::from_secs(12 * 3600),
        },
    },
    Row {
        codes: &[131026],
        meaning: "undeliverable",
        action: || Action::Permanent {
            reason: "message undeliverable to this recipient (131026)",
            opt_out: false,
        },
    },
    Row {
        codes: &[131047],
        meaning: "outside the 24 h window",
        action: || Action::Permanent {
            reason:
                "more than 24 hours since the user's last message: a template is needed (131047)",
            opt_out: false,
        },
    },
    Row {
        codes: &[131050],
        meaning: "user stopped marketing messages",
        action: || Action::Permanent {
            reason: "the user stopped marketing messages (131050)",
            opt_out: true,
        },
    },
    Row {
        codes: &[368],
        meaning: "blocked for policy violation",
        action: || Action::PauseChannel {
            reason: "Meta blocked the account for a policy violation (368)",
            broadcasts_only: false,
        },
    },
    Row {
        codes: &[190],
        meaning: "access token expired or revoked",
        action: || Action::PauseChannel {
            reason: "the access token expired or was revoked (190): reconnect the channel",
            broadcasts_only: false,
        },
    },
    Row {
        codes: &[100, 131008, 131009],
        meaning: "bad parameters",
        action: || Action::Permanent {
            reason: "Meta refused the message's parameters",
            opt_out: false,
        },
    },
    Row {
        codes: &[551],
        meaning: "person unavailable (Messenger)",
        action: || Action::Permanent {
            reason: "the person is not available (551)",
            opt_out: false,
        },
    },
];

/// Herald's answer to Meta's error `code` (and the HTTP status, used only when the body carried
/// no code).
pub fn classify(code: Option<i64>, http_status: u16) -> Action {
    if let Some(code) = code {
        if let Some(row) = TABLE.iter().find(|r| r.codes.contains(&code)) {
            return (row.action)();
        }
        if (132000..=132015).contains(&code) {
            return Action::Permanent {
                reason: "Meta refused the template or its parameters",
                opt_out: false,
            };
        }
        if http_status >= 500 {
            return Action::Retry;
        }
        // An unknown code on a 4xx: retrying blindly would hammer Meta; the kind's backoff
        // bounds it and the attempts run out.
        return Action::Retry;
    }
    match http_status {
        401 => Action::PauseChannel {
            reason: "Meta refused the access token (HTTP 401)",
            broadcasts_only: false,
        },
        429 => Action::SlowChannel {
            retry_after: Duration::from_secs(1),
        },
        _ => Action::Retry,
    }
}

/// Backoff for the pair rate limit: 4^n seconds after the n-th hit (n from 0), capped at 4^6
/// s (about 68 minutes).
pub fn pair_backoff(hits_before: u32) -> Duration {
    Duration::from_secs(4u64.pow(hits_before.min(6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_domain_table() {
        let slow = |s| Action::SlowChannel {
            retry_after: Duration::from_secs(s),
        };
        assert_eq!(classify(Some(130429), 400), slow(1));
        assert_eq!(classify(Some(131056), 400), Action::RetryRecipient);
        assert_eq!(
            classify(Some(131057), 400),
            Action::Wait {
                retry_after: Duration::from_secs(60)
            }
        );
        for code in [4, 17, 32, 613, 80007] {
            assert_eq!(classify(Some(code), 400), slow(60), "code {code}");
        }
        for code in [1, 2, 131016] {
            assert_eq!(classify(Some(code), 500), Action::Retry, "code {code}");
        }
        assert!(matches!(
            classify(Some(131048), 400),
            Action::PauseChannel {
                broadcasts_only: true,
                ..
            }
        ));
        assert!(matches!(
            classify(Some(131049), 400),
            Action::Wait { retry_after } if retry_after >= Duration::from_secs(6 * 3600)
        ));
        for code in [131026, 131047] {
            assert!(matches!(
                classify(Some(code), 400),
                Action::Permanent { opt_out: false, .. }
            ));
        }
        assert!(matches!(
            classify(Some(131050), 400),
            Action::Permanent { opt_out: true, .. }
        ));
        assert!(matches!(
            classify(Some(368), 400),
            Action::PauseChannel { .. }
        ));
        assert!(matches!(
            classify(Some(190), 401),
            Action::PauseChannel { .. }
        ));
        for code in [100, 131008, 131009, 132000, 132001, 132015] {
            assert!(
                matches!(classify(Some(code), 400), Action::Permanent { .. }),
                "code {code}"
            );
        }
    }

    #[test]
    fn no_code_falls_back_on_the_http_status() {
        assert_eq!(classify(None, 503), Action::Retry);
        assert!(matches!(classify(None, 401), Action::PauseChannel { .. }));
        assert!(matches!(classify(None, 429), Action::SlowChannel { .. }));
        assert_eq!(classify(Some(999_999), 400), Action::Retry);
    }

    #[test]
    fn pair_backoff_is_four_to_the_n() {
        assert_eq!(pair_backoff(0), Duration::from_secs(1));
        assert_eq!(pair_backoff(1), Duration::from_secs(4));
        assert_eq!(pair_backoff(2), Duration::from_secs(16));
        assert_eq!(pair_backoff(60), Duration::from_secs(4096));
    }

    #[test]
    fn table_codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for row in TABLE {
            for code in row.codes {
                assert!(seen.insert(code), "code {code} is in two rows");
            }
        }
    }
}
