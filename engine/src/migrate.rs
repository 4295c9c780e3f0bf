//! Schema migrations: the SQL files under `migrations/{postgres,sqlite}/`, compiled into the
//! binary and applied in order, all pending ones in one transaction (a failed migration leaves
//! the schema as it was), recorded in `herald_migrations`.

/// One migration: its number, name and SQL.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs",
        sql: include_str!("../../migrations/postgres/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "delivery",
        sql: include_str!("../../migrations/postgres/0002_delivery.sql"),
    },
    Migration {
        version: 3,
        name: "inbox",
        sql: include_str!("../../migrations/postgres/0003_inbox.sql"),
    },
    Migration {
        version: 4,
        name: "sealed_secrets",
        sql: include_str!("../../migrations/postgres/0004_sealed_secrets.sql"),
    },
    Migration {
        version: 5,
        name: "tenancy",
        sql: include_str!("../../migrations/postgres/0005_tenancy.sql"),
    },
    Migration {
        version: 6,
        name: "contacts",
        sql: include_str!("../../migrations/postgres/0006_contacts.sql"),
    },
    Migration {
        version: 7,
        name: "queues_templates",
        sql: include_str!("../../migrations/postgres/0007_queues_templates.sql"),
    },
    Migration {
        version: 8,
        name: "contact_handles",
        sql: include_str!("../../migrations/postgres/0008_contact_handles.sql"),
    },
    Migration {
        version: 9,
        name: "limiter_fallbacks",
        sql: include_str!("../../migrations/postgres/0009_limiter_fallbacks.sql"),
    },
];

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs",
        sql: include_str!("../../migrations/sqlite/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "delivery",
        sql: include_str!("../../migrations/sqlite/0002_delivery.sql"),
    },
    Migration {
        version: 3,
        name: "inbox",
        sql: include_str!("../../migrations/sqlite/0003_inbox.sql"),
    },
    Migration {
        version: 4,
        name: "sealed_secrets",
        sql: include_str!("../../migrations/sqlite/0004_sealed_secrets.sql"),
    },
    Migration {
        version: 5,
        name: "tenancy",
        sql: include_str!("../../migrations/sqlite/0005_tenancy.sql"),
    },
    Migration {
        version: 6,
        name: "contacts",
        sql: include_str!("../../migrations/sqlite/0006_contacts.sql"),
    },
    Migration {
        version: 7,
        name: "queues_templates",
        sql: include_str!("../../migrations/sqlite/0007_queues_templates.sql"),
    },
    Migration {
        version: 8,
        name: "contact_handles",
        sql: include_str!("../../migrations/sqlite/0008_contact_handles.sql"),
    },
    Migration {
        version: 9,
        name: "limiter_fallbacks",
        sql: include_str!("../../migrations/sqlite/0009_limiter_fallbacks.sql"),
    },
];

#[cfg(test)]
mod tests {
    #[test]
    fn versions_increase_and_backends_match() {
        for set in [super::POSTGRES, super::SQLITE] {
            assert!(set.windows(2).all(|w| w[0].version < w[1].version));
        }
        let pg: Vec<_> = super::POSTGRES
            .iter()
            .map(|m| (m.version, m.name))
            .collect();
        let lite: Vec<_> = super::SQLITE.iter().map(|m| (m.version, m.name)).collect();
        assert_eq!(pg, lite, "every migration exists for both backends");
    }
}
