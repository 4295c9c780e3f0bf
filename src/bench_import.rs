//! `herald bench import`: a bulk contact import through the real HTTP path. It starts `herald
//! serve` on a fresh PostgreSQL schema (or SQLite file), creates a workspace and an API key,
//! uploads N contacts as one CSV or NDJSON body (one row in a thousand invalid), and prints
//! as its last line `{"contacts":N,"format":..,"seconds":..,"rows_per_sec":..,"stored":..,
//! "rejected":..}`.

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use herald_engine::ConnectOptions;
use serde_json::{json, Value};

use crate::bench_server::{drop_schema, fresh_schema, ServeOptions, Server};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ImportFormat {
    Csv,
    Ndjson,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Contacts in the upload.
    #[arg(long, default_value_t = 1_000_000)]
    contacts: usize,
    #[arg(long, value_enum, default_value_t = ImportFormat::Csv)]
    format: ImportFormat,
    /// PostgreSQL (a fresh schema is created and dropped) or `sqlite:PATH`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
}

pub async fn run(args: ImportArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.contacts == 0 {
        return Err("--contacts must be above zero".into());
    }
    let pg = args.database_url.starts_with("postgres");
    let schema = fresh_schema("import");
    let master_key = herald_engine::crypto::generate_key();
    let store = herald_engine::connect(
        &args.database_url,
        &ConnectOptions {
            schema: pg.then(|| schema.clone()),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let result = bench(&args, store, pg.then_some(schema.as_str()), &master_key).await;
    if pg {
        drop_schema(&args.database_url, &schema).await;
    }
    result
}

/// The upload: every thousandth row has a phone that is not E.164.
fn body(format: ImportFormat, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 70);
    if let ImportFormat::Csv = format {
        out.extend_from_slice(b"phone,name,labels,city\n");
    }
    for i in 0..n {
        let phone = if i % 1000 == 999 {
            format!("555{i:07}")
        } else {
            format!("+1{:010}", 2_000_000_000u64 + i as u64)
        };
        let line = match format {
            ImportFormat::Csv => format!("{phone},Person {i},customer;batch-{},Lisbon\n", i % 10),
            ImportFormat::Ndjson => format!(
                "{{\"phone\":\"{phone}\",\"name\":\"Person {i}\",\"labels\":[\"customer\",\"batch-{}\"],\"attributes\":{{\"city\":\"Lisbon\"}}}}\n",
                i % 10
            ),
        };
        out.extend_from_slice(line.as_bytes());
    }
    out
}

async fn bench(
    args: &ImportArgs,
    store: std::sync::Arc<dyn herald_engine::Store>,
    schema: Option<&str>,
    master_key: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let workspace = store
        .tenancy()
        .create_workspace("bench", chrono::Utc::now())
        .await?;
    let key = store
        .tenancy()
        .create_api_key(workspace.id, "bench", chrono::Utc::now())
        .await?;
    let server = Server::spawn(&ServeOptions {
        database_url: &args.database_url,
        schema,
        master_key,
        queues: "",
        worker_id: "bench-import",
    })?;
    server.wait_ready().await?;
    let base = server.base.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let upload = body(args.format, args.contacts);
    let bytes = upload.len();
    let content_type = match args.format {
        ImportFormat::Csv => "text/csv",
        ImportFormat::Ndjson => "application/x-ndjson",
    };
    let started = Instant::now();
    let response = http
        .post(format!("{base}/v1/contacts/import"))
        .bearer_auth(&key.secret)
        .header("content-type", content_type)
        .body(upload)
        .send()
        .await?;
    let status = response.status();
    let report: Value = response.json().await?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.is_success() {
        return Err(format!("the import answered {status}: {report}").into());
    }
    let counted = store.contacts().contact_count(workspace.id).await?;
    eprintln!(
        "bench import: {} contacts ({:.1} MB of {:?}) in {seconds:.2}s; {} stored, {} rejected (first: {}); {counted} contacts in the database",
        args.contacts,
        bytes as f64 / 1e6,
        args.format,
        report["stored"],
        report["rejected"],
        report["errors"][0]
    );
    println!(
        "{}",
        json!({
            "contacts": args.contacts,
            "format": format!("{:?}", args.format).to_lowercase(),
            "seconds": (seconds * 100.0).round() / 100.0,
            "rows_per_sec": (args.contacts as f64 / seconds).round(),
            "stored": report["stored"],
            "rejected": report["rejected"],
            "in_database": counted,
        })
    );
    let expected_rejected = (args.contacts / 1000) as u64;
    if report["rejected"].as_u64() != Some(expected_rejected)
        || counted as u64 != args.contacts as u64 - expected_rejected
    {
        return Err("the import stored or rejected other rows than it was sent".into());
    }
    Ok(())
}
