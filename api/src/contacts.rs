//! `/v1/contacts`: create, read, list (by label), update, delete, and the streamed bulk import.
//!
//! `POST /v1/contacts/import` takes NDJSON (`application/x-ndjson`: one contact object a line)
//! or CSV (`text/csv`: a header row naming `phone` and optionally `name`, `labels` (separated by
//! `;`) and `opted_out`; every other column becomes a string attribute). The body is parsed as
//! it arrives and stored in batches while the rest streams in, each batch one transaction that
//! creates or updates contacts by phone. A bad row (not E.164, bad JSON, too many labels…) is
//! reported with its line number and skipped; it never costs a valid row its place. Importing
//! the same file twice changes nothing, so an import cut short by an error can be sent again.

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures_util::StreamExt;
use herald_engine::contacts::{Contact, ContactPatch, NewContact};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::openapi::PROBLEM;
use crate::v1::{path_id, ApiError, Caller, Page, PageQuery};
use crate::{AppState, Problem};

/// Rows stored per transaction during an import, across the writers.
const IMPORT_BATCH: usize = 50_000;
/// Transactions of one import in flight at once (database connections it takes).
const IMPORT_WRITERS: usize = 2;
/// Rejected rows listed in an import's answer at most (all are counted).
const MAX_REPORTED: usize = 1_000;
/// Largest import body.
pub const MAX_IMPORT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Longest line (NDJSON) or record (CSV).
const MAX_LINE: usize = 64 * 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(import))
        .routes(routes!(read, update, remove))
}

/// Creates a contact in the caller's workspace.
#[utoipa::path(
    post,
    path = "/v1/contacts",
    operation_id = "create_contact",
    tag = "contacts",
    security(("api_key" = [])),
    request_body = NewContact,
    responses(
        (status = 201, description = "The contact, normalised (E.164 phone, sorted labels)", body = Contact),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The workspace has a contact with this phone", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or a value is refused (phone not E.164, labels, attributes)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewContact>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(c) = body?;
    let contact = state
        .store
        .contacts()
        .create_contact(caller.workspace_id, &c, Utc::now())
        .await?;
    Ok((StatusCode::CREATED, Json(contact)).into_response())
}

/// `?limit=&after=&label=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size: 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    after: Option<String>,
    /// Only the contacts with this label.
    label: Option<String>,
}

/// Lists the caller's workspace's contacts, by id, optionally those with a label.
#[utoipa::path(
    get,
    path = "/v1/contacts",
    operation_id = "list_contacts",
    tag = "contacts",
    security(("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of contacts", body = Page<Contact>),
        (status = 400, description = "A bad `limit` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<Contact>>, ApiError> {
    let Query(q) = q?;
    let (after, limit) = PageQuery::check(q.limit, q.after)?;
    let rows = state
        .store
        .contacts()
        .contacts(caller.workspace_id, q.label.as_deref(), after, limit + 1)
        .await?;
    Ok(Json(Page::of(rows, limit, |c| c.id)))
}

/// One of the caller's contacts.
#[utoipa::path(
    get,
    path = "/v1/contacts/{id}",
    operation_id = "get_contact",
    tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The contact's id")),
    responses(
        (status = 200, description = "The contact", body = Contact),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such contact in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Contact>, ApiError> {
    state
        .store
        .contacts()
        .contact(caller.workspace_id, path_id(&id, "contact")?)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("contact"))
}

/// Changes one of the caller's contacts; absent fields stay as they are.
#[utoipa::path(
    patch,
    path = "/v1/contacts/{id}",
    operation_id = "update_contact",
    tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The contact's id")),
    request_body = ContactPatch,
    responses(
        (status = 200, description = "The contact, changed", body = Contact),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such contact in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or a value is refused", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<ContactPatch>, JsonRejection>,
) -> Result<Json<Contact>, ApiError> {
    let id = path_id(&id, "contact")?;
    let Json(patch) = body?;
    state
        .store
        .contacts()
        .update_contact(caller.workspace_id, id, &patch, Utc::now())
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("contact"))
}

/// Deletes one of the caller's contacts.
#[utoipa::path(
    delete,
    path = "/v1/contacts/{id}",
    operation_id = "delete_contact",
    tag = "contacts",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The contact's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such contact in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .store
        .contacts()
        .delete_contact(caller.workspace_id, path_id(&id, "contact")?)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("contact"))
    }
}

/// A row an import refused.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Rejected {
    /// 1-based line (NDJSON) or record (CSV, the header being record 1).
    pub line: u64,
    pub error: String,
}

/// An import's answer.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ImportReport {
    /// Rows read (not counting the CSV header or blank lines).
    pub rows: u64,
    /// Rows stored (created, or updated by phone).
    pub stored: u64,
    /// Rows refused (all of them counted).
    pub rejected: u64,
    /// The first 1,000 rejected rows, with why.
    pub errors: Vec<Rejected>,
}

impl ImportReport {
    fn reject(&mut self, line: u64, error: String) {
        self.rejected += 1;
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(Rejected { line, error });
        }
    }
}

enum Format {
    Ndjson,
    Csv,
}

/// Imports contacts from NDJSON or CSV.
///
/// Creates or updates contacts by phone from a streamed body, stored in batches while the rest
/// arrives. A bad row is reported with its line and skipped; importing the same file twice
/// changes nothing, so an import cut short can be sent again.
#[utoipa::path(
    post,
    path = "/v1/contacts/import",
    operation_id = "import_contacts",
    tag = "contacts",
    security(("api_key" = [])),
    request_body(
        description = "Up to 2 GiB, parsed as it arrives. NDJSON (`application/x-ndjson`, also \
            accepted as `application/ndjson` or `application/jsonl`): one `NewContact` object a \
            line (the `NewContact` schema). CSV (`text/csv`): a header row naming `phone` and optionally `name`, `labels` \
            (separated by `;`) and `opted_out`; every other column becomes a string attribute. \
            Lines (records) of at most 64 KiB.",
        content(
            (String = "application/x-ndjson", example = json!("{\"phone\": \"+14155550100\", \"name\": \"Ada\", \"labels\": [\"vip\"]}\n{\"phone\": \"+14155550101\"}\n")),
            (String = "application/ndjson"),
            (String = "application/jsonl"),
            (String = "text/csv", example = json!("phone,name,labels,opted_out,city\n+14155550100,Ada,vip;beta,false,Paris\n")),
        ),
    ),
    responses(
        (status = 200, description = "Every row read: the stored ones counted, the refused ones listed with their line", body = ImportReport),
        (status = 400, description = "A line (record) longer than 64 KiB, or the upload broke off", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 413, description = "The body is larger than 2 GiB", body = Problem, content_type = PROBLEM),
        (status = 415, description = "The body is neither NDJSON nor CSV", body = Problem, content_type = PROBLEM),
        (status = 422, description = "A CSV body without a header naming the phone column", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500); batches stored before stay stored, and sending the file again is harmless", body = Problem, content_type = PROBLEM),
    ),
)]
async fn import(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let format = match content_type.as_str() {
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Format::Ndjson,
        "text/csv" => Format::Csv,
        _ => {
            return Err(ApiError::Unsupported(
                "send contacts as application/x-ndjson or text/csv".into(),
            ))
        }
    };
    let mut report = ImportReport::default();
    let mut parser = match format {
        Format::Ndjson => Parser::Ndjson(Lines::default()),
        Format::Csv => Parser::Csv(Box::default()),
    };
    // Rows go to IMPORT_WRITERS writer tasks by a hash of their phone, so the next batch is
    // parsed while others are stored, on as many database connections. A phone always goes to
    // the same writer: its rows are applied in file order (the last wins), and two writers
    // never wait on each other's rows.
    let mut senders = Vec::with_capacity(IMPORT_WRITERS);
    let mut writers = Vec::with_capacity(IMPORT_WRITERS);
    for _ in 0..IMPORT_WRITERS {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<NewContact>>(1);
        let store = state.store.clone();
        let workspace_id = caller.workspace_id;
        senders.push(tx);
        writers.push(tokio::spawn(async move {
            let mut stored = 0u64;
            while let Some(batch) = rx.recv().await {
                stored += store
                    .contacts()
                    .import_contacts(workspace_id, &batch, Utc::now())
                    .await?
                    .stored;
            }
            Ok::<u64, herald_engine::StoreError>(stored)
        }));
    }
    let per_writer = IMPORT_BATCH / IMPORT_WRITERS;
    let mut parsed: Vec<NewContact> = Vec::with_capacity(4096);
    let mut batches: Vec<Vec<NewContact>> = (0..IMPORT_WRITERS)
        .map(|_| Vec::with_capacity(per_writer))
        .collect();
    let mut bytes = 0u64;
    let mut stream = body.into_data_stream();
    let mut failed: Option<ApiError> = None;
    let mut more = true;
    while more {
        let chunk = match stream.next().await {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                failed = Some(ApiError::BadRequest(format!("the upload broke off: {e}")));
                break;
            }
            None => None,
        };
        match &chunk {
            Some(chunk) => {
                bytes += chunk.len() as u64;
                if bytes > MAX_IMPORT_BYTES {
                    failed = Some(ApiError::TooLarge(format!(
                        "an import may have at most {MAX_IMPORT_BYTES} bytes"
                    )));
                    break;
                }
                if let Err(e) = parser.feed(chunk, &mut report, &mut parsed) {
                    failed = Some(e);
                    break;
                }
            }
            None => {
                more = false;
                if let Err(e) = parser.finish(&mut report, &mut parsed) {
                    failed = Some(e);
                    break;
                }
            }
        }
        for c in parsed.drain(..) {
            let w = writer_of(&c.phone);
            batches[w].push(c);
        }
        for (w, batch) in batches.iter_mut().enumerate() {
            if batch.len() >= per_writer || (!more && !batch.is_empty()) {
                let full = std::mem::replace(batch, Vec::with_capacity(per_writer));
                if senders[w].send(full).await.is_err() {
                    // The writer stopped on an error; its result says which.
                    more = false;
                }
            }
        }
    }
    drop(senders);
    let mut stored: Result<u64, ApiError> = Ok(0);
    for writer in writers {
        let result = match writer.await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => {
                tracing::error!(error = %e, "contact import: writer task failed");
                Err(ApiError::Internal)
            }
        };
        stored = match (stored, result) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    }
    // Batches stored before a failure stay stored; sending the file again is harmless.
    if let Some(e) = failed {
        return Err(e);
    }
    report.stored = stored?;
    Ok((StatusCode::OK, Json(report)).into_response())
}

/// The writer a phone's rows go to.
fn writer_of(phone: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    phone.hash(&mut h);
    (h.finish() % IMPORT_WRITERS as u64) as usize
}

enum Parser {
    Ndjson(Lines),
    Csv(Box<CsvParser>),
}

impl Parser {
    fn feed(
        &mut self,
        chunk: &[u8],
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        match self {
            Parser::Ndjson(lines) => lines.feed(chunk, |n, line| ndjson_row(n, line, report, out)),
            Parser::Csv(csv) => csv.feed(chunk, report, out),
        }
    }

    fn finish(
        &mut self,
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        match self {
            Parser::Ndjson(lines) => lines.finish(|n, line| ndjson_row(n, line, report, out)),
            Parser::Csv(csv) => csv.finish(report, out),
        }
    }
}

/// Splits a byte stream into lines across chunk boundaries.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
    line: u64,
}

impl Lines {
    fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(u64, &[u8])) -> Result<(), ApiError> {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            self.line += 1;
            if self.pending.is_empty() {
                each(self.line, &rest[..pos]);
            } else {
                self.pending.extend_from_slice(&rest[..pos]);
                let line = std::mem::take(&mut self.pending);
                each(self.line, &line);
            }
            rest = &rest[pos + 1..];
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_LINE {
            return Err(ApiError::BadRequest(format!(
                "line {} is longer than {MAX_LINE} bytes",
                self.line + 1
            )));
        }
        Ok(())
    }

    fn finish(&mut self, mut each: impl FnMut(u64, &[u8])) -> Result<(), ApiError> {
        if !self.pending.is_empty() {
            self.line += 1;
            let line = std::mem::take(&mut self.pending);
            each(self.line, &line);
        }
        Ok(())
    }
}

fn ndjson_row(n: u64, line: &[u8], report: &mut ImportReport, out: &mut Vec<NewContact>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    report.rows += 1;
    match serde_json::from_slice::<NewContact>(line)
        .map_err(|e| e.to_string())
        .and_then(|c| c.normalized())
    {
        Ok(c) => out.push(c),
        Err(e) => report.reject(n, e),
    }
}

/// CSV through csv-core: records may span chunks (and quoted fields may hold newlines).
struct CsvParser {
    reader: csv_core::Reader,
    /// The current record's field bytes and where each field ends.
    fields: Vec<u8>,
    ends: Vec<usize>,
    fields_len: usize,
    ends_len: usize,
    record: u64,
    /// Column positions, from the header.
    header: Option<Columns>,
    /// The first bytes, held until it is clear whether they are a byte order mark.
    head: Vec<u8>,
    started: bool,
}

impl Default for CsvParser {
    fn default() -> Self {
        CsvParser {
            // `Reader::new`, not `Reader::default`: only the former builds the DFA.
            reader: csv_core::Reader::new(),
            fields: Vec::new(),
            ends: Vec::new(),
            fields_len: 0,
            ends_len: 0,
            record: 0,
            header: None,
            head: Vec::new(),
            started: false,
        }
    }
}

struct Columns {
    phone: usize,
    name: Option<usize>,
    labels: Option<usize>,
    opted_out: Option<usize>,
    /// Other columns: attributes.
    others: Vec<(usize, String)>,
}

impl CsvParser {
    fn feed(
        &mut self,
        input: &[u8],
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        // csv-core reads an empty input as the end of the data, and strips a byte order mark
        // only when it arrives whole; so the mark is taken off here, and nothing empty is fed.
        if self.started {
            if input.is_empty() {
                return Ok(());
            }
            return self.parse(input, report, out);
        }
        self.head.extend_from_slice(input);
        if self.head.len() < 3 {
            return Ok(());
        }
        self.started = true;
        let head = std::mem::take(&mut self.head);
        let rest = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
        if rest.is_empty() {
            return Ok(());
        }
        self.parse(rest, report, out)
    }

    fn parse(
        &mut self,
        mut input: &[u8],
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        loop {
            if self.fields.len() < self.fields_len + 1024 {
                self.fields.resize((self.fields.len() * 2).max(4096), 0);
            }
            if self.ends.len() < self.ends_len + 16 {
                self.ends.resize((self.ends.len() * 2).max(64), 0);
            }
            let (result, nin, nout, nend) = self.reader.read_record(
                input,
                &mut self.fields[self.fields_len..],
                &mut self.ends[self.ends_len..],
            );
            // Field ends count from the record's start (csv-core keeps the position across
            // calls), so they index `fields` as they are.
            input = &input[nin..];
            self.fields_len += nout;
            self.ends_len += nend;
            match result {
                csv_core::ReadRecordResult::InputEmpty => {
                    if self.fields_len > MAX_LINE {
                        return Err(ApiError::BadRequest(format!(
                            "record {} is longer than {MAX_LINE} bytes",
                            self.record + 1
                        )));
                    }
                    return Ok(());
                }
                csv_core::ReadRecordResult::OutputFull
                | csv_core::ReadRecordResult::OutputEndsFull => continue,
                csv_core::ReadRecordResult::Record => {
                    self.record += 1;
                    self.record_done(report, out)?;
                }
                csv_core::ReadRecordResult::End => return Ok(()),
            }
        }
    }

    fn finish(
        &mut self,
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        if !self.started {
            // Fewer than three bytes in all.
            self.started = true;
            let head = std::mem::take(&mut self.head);
            if !head.is_empty() {
                self.parse(&head, report, out)?;
            }
        }
        // An empty input tells csv-core the data ended: it completes a last record without a
        // trailing newline.
        self.parse(&[], report, out)?;
        if self.header.is_none() {
            return Err(ApiError::Invalid(
                "a CSV import needs a header row naming the phone column".into(),
            ));
        }
        Ok(())
    }

    fn record_done(
        &mut self,
        report: &mut ImportReport,
        out: &mut Vec<NewContact>,
    ) -> Result<(), ApiError> {
        let mut fields: Vec<&[u8]> = Vec::with_capacity(self.ends_len);
        let mut start = 0;
        for &end in &self.ends[..self.ends_len] {
            fields.push(&self.fields[start..end]);
            start = end;
        }
        let line = self.record;
        let result = match &self.header {
            None => {
                self.header = Some(columns(&fields)?);
                None
            }
            Some(cols) => {
                if fields.len() == 1 && fields[0].is_empty() {
                    None // a blank line
                } else {
                    Some(csv_contact(cols, &fields))
                }
            }
        };
        self.fields_len = 0;
        self.ends_len = 0;
        if let Some(result) = result {
            report.rows += 1;
            match result.and_then(|c| c.normalized()) {
                Ok(c) => out.push(c),
                Err(e) => report.reject(line, e),
            }
        }
        Ok(())
    }
}

fn columns(header: &[&[u8]]) -> Result<Columns, ApiError> {
    let names: Vec<String> = header
        .iter()
        .map(|h| {
            String::from_utf8_lossy(h)
                .trim()
                .trim_start_matches('\u{feff}')
                .to_owned()
        })
        .collect();
    let find = |n: &str| names.iter().position(|h| h.eq_ignore_ascii_case(n));
    let phone = find("phone")
        .ok_or_else(|| ApiError::Invalid("the CSV header must name a phone column".into()))?;
    let (name, labels, opted_out) = (find("name"), find("labels"), find("opted_out"));
    let others = names
        .iter()
        .enumerate()
        .filter(|(i, h)| {
            Some(*i) != Some(phone)
                && Some(*i) != name
                && Some(*i) != labels
                && Some(*i) != opted_out
                && !h.is_empty()
        })
        .map(|(i, h)| (i, h.clone()))
        .collect();
    Ok(Columns {
        phone,
        name,
        labels,
        opted_out,
        others,
    })
}

fn csv_contact(cols: &Columns, fields: &[&[u8]]) -> Result<NewContact, String> {
    let text = |i: usize| -> Result<&str, String> {
        let raw = fields.get(i).copied().unwrap_or(b"");
        std::str::from_utf8(raw).map_err(|_| "the row is not UTF-8".to_owned())
    };
    let opt = |i: Option<usize>| -> Result<Option<&str>, String> {
        match i {
            Some(i) => Ok(Some(text(i)?.trim()).filter(|s| !s.is_empty())),
            None => Ok(None),
        }
    };
    let opted_out = match opt(cols.opted_out)?.map(str::to_ascii_lowercase).as_deref() {
        None | Some("false" | "0" | "no" | "n") => false,
        Some("true" | "1" | "yes" | "y") => true,
        Some(other) => return Err(format!("opted_out {other:?} is not true or false")),
    };
    let mut attributes = serde_json::Map::new();
    for (i, name) in &cols.others {
        let v = text(*i)?;
        if !v.is_empty() {
            attributes.insert(name.clone(), serde_json::Value::String(v.to_owned()));
        }
    }
    Ok(NewContact {
        phone: text(cols.phone)?.to_owned(),
        name: opt(cols.name)?.map(str::to_owned),
        labels: opt(cols.labels)?
            .map(|l| {
                l.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        attributes,
        opted_out,
    })
}
