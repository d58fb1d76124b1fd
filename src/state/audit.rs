//! The audit trail in the database: one chain and one gap-free `seq` for every
//! replica. A batch is one transaction that locks the chain's head row
//! (`keygate_audit_head ... FOR UPDATE`), chains its records after it, inserts
//! them, moves the head and commits — so writers on several replicas take
//! turns on the head and can neither lose nor repeat a `seq`. A batch holding a
//! durable record commits with `synchronous_commit = on` (the server has
//! flushed it before the bypass request leaves); a batch of best-effort
//! records only does not wait for the flush.
//!
//! Each row keeps its line exactly as hashed (`keygate audit export` writes
//! them out byte for byte), plus the columns `keygate audit search` filters on.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_postgres::{Client, GenericClient};

use super::{Db, DbError};
use crate::audit::chain::{check_line, Head};
use crate::audit::verify::{link, Link};
use crate::audit::writer::Sink;
use crate::audit::{AuditError, Encoded, Shared};

/// What search filters on, read from a record's fields.
#[derive(Deserialize, Default)]
struct Indexed {
    client_id: Option<String>,
    route: Option<String>,
    path: Option<String>,
    replica: Option<String>,
}

fn indexed(fields: &[u8]) -> Indexed {
    let mut object = Vec::with_capacity(fields.len() + 2);
    object.push(b'{');
    object.extend_from_slice(fields);
    object.push(b'}');
    serde_json::from_slice(&object).unwrap_or_default()
}

/// Appends `records` (stamped `ts`) to the chain in one transaction and
/// returns the last `seq` written. Every record names `replica` (records that
/// carry their own `replica` member keep it).
pub async fn append(
    client: &mut Client,
    replica: &str,
    ts: &str,
    records: &[Encoded],
    durable: bool,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    if !durable {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
    }
    let row = tx
        .query_one(
            "SELECT seq, hash FROM keygate_audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let mut head = Head {
        seq: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        prev: row.get(1),
    };
    let replica_member = format!("\"replica\":{},", serde_json::Value::from(replica));
    let n = records.len();
    let (mut seqs, mut events, mut replicas, mut clients, mut routes, mut paths, mut lines) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut fields = Vec::with_capacity(512);
    let mut line = Vec::with_capacity(1024);
    for r in records {
        let index = indexed(&r.fields);
        fields.clear();
        let written_by = match index.replica {
            Some(own) => own,
            None => {
                fields.extend_from_slice(replica_member.as_bytes());
                replica.to_owned()
            }
        };
        fields.extend_from_slice(&r.fields);
        if fields.last() == Some(&b',') {
            fields.pop();
        }
        line.clear();
        head.append(&mut line, ts, r.event, &fields);
        line.pop();
        seqs.push(i64::try_from(head.seq).unwrap_or(i64::MAX));
        events.push(r.event);
        replicas.push(written_by);
        clients.push(index.client_id);
        routes.push(index.route);
        paths.push(index.path);
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
    let stamps = vec![ts; n];
    tx.execute(
        "INSERT INTO keygate_audit (seq, ts, event, replica, client_id, route, path, line)
         SELECT s, t::timestamptz, e, r, c, ro, p, l
         FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[]) AS u(s, t, e, r, c, ro, p, l)",
        &[
            &seqs, &stamps, &events, &replicas, &clients, &routes, &paths, &lines,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE keygate_audit_head SET seq = $1, hash = $2 WHERE id = 1",
        &[&i64::try_from(head.seq).unwrap_or(i64::MAX), &head.prev],
    )
    .await?;
    tx.commit().await?;
    Ok(head.seq)
}

/// The writer's sink: a connection of its own, driven by a small runtime on
/// the writer thread; reconnects after a failure, at most once a second.
pub struct PgSink {
    runtime: tokio::runtime::Runtime,
    db: Arc<Db>,
    client: Option<Client>,
    replica: String,
    shared: Arc<Shared>,
    next_attempt: Instant,
}

impl PgSink {
    /// Connects and reads the head: the `seq` the next record gets.
    pub fn open(
        db: Arc<Db>,
        replica: String,
        shared: Arc<Shared>,
    ) -> Result<(PgSink, u64), DbError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DbError::Unreachable(format!("cannot start a runtime: {e}")))?;
        let (client, next) = runtime.block_on(async {
            let client = db.connect().await?;
            let row = client
                .query_one("SELECT seq FROM keygate_audit_head WHERE id = 1", &[])
                .await?;
            Ok::<_, DbError>((client, row.get::<_, i64>(0)))
        })?;
        let sink = PgSink {
            runtime,
            db,
            client: Some(client),
            replica,
            shared,
            next_attempt: Instant::now(),
        };
        Ok((sink, u64::try_from(next).unwrap_or(0) + 1))
    }

    /// The connection, (re)made if need be, at most one attempt a second.
    fn take_connected(&mut self) -> Result<Client, AuditError> {
        match self.client.take() {
            Some(client) if !client.is_closed() => return Ok(client),
            _ => {}
        }
        if Instant::now() < self.next_attempt {
            return Err(AuditError::Write(
                "the database is unreachable (retrying every second)".into(),
            ));
        }
        self.next_attempt = Instant::now() + Duration::from_secs(1);
        let db = Arc::clone(&self.db);
        let client = self
            .runtime
            .block_on(async move { db.connect().await })
            .map_err(|e| AuditError::Write(e.to_string()))?;
        tracing::info!("audit: connected to the database");
        Ok(client)
    }
}

impl Sink for PgSink {
    fn write(&mut self, ts: &str, records: &[Encoded], durable: bool) -> Result<(), AuditError> {
        let limit = self.shared.settings().write_timeout;
        let started = Instant::now();
        let mut client = self.take_connected()?;
        // `Runtime::block_on` (not a handle's): it also drives the connection's
        // task, which lives on this runtime.
        let replica = &self.replica;
        let result = self.runtime.block_on(async {
            tokio::time::timeout(limit, append(&mut client, replica, ts, records, durable)).await
        });
        match result {
            Ok(Ok(_)) => {
                self.client = Some(client);
                if durable {
                    self.shared.synced(started.elapsed());
                }
                Ok(())
            }
            // Whatever the connection was doing is abandoned with it (dropped
            // here): the server rolls the transaction back, nothing of the
            // batch stays.
            Ok(Err(e)) => Err(AuditError::Write(e.to_string())),
            Err(_) => Err(AuditError::Timeout(limit)),
        }
    }

    fn tick(&mut self, _closing: bool) {
        // While the database is away, readiness says so without waiting for a
        // request; and the first success clears it.
        if self.client.as_ref().is_none_or(Client::is_closed) {
            match self.take_connected() {
                Ok(client) => {
                    self.client = Some(client);
                    self.shared.written(0);
                }
                Err(e) => self.shared.failed(&e.to_string()),
            }
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Rows read per query while verifying or exporting.
const PAGE: i64 = 5000;

/// Reads the trail in `seq` order from `after`, a page at a time.
async fn pages(
    client: &impl GenericClient,
    mut after: i64,
    mut each: impl FnMut(i64, &str) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let rows = client
            .query(
                "SELECT seq, line FROM keygate_audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &PAGE],
            )
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        for row in &rows {
            let seq: i64 = row.get(0);
            each(seq, row.get(1))?;
            after = seq;
        }
        if (rows.len() as i64) < PAGE {
            return Ok(());
        }
    }
}

/// Recomputes every hash, `prev` link and `seq` of the trail in the database,
/// and checks the head row against the last record (a deleted tail shows).
pub async fn verify(client: &impl GenericClient) -> Result<Verified, String> {
    let mut prev: Option<(u64, String)> = None;
    let mut report = Verified {
        records: 0,
        first_seq: None,
        last_seq: None,
    };
    pages(client, 0, |row_seq, line| {
        let at = |why: &str| format!("record seq {row_seq}: {why}");
        let checked = check_line(line).map_err(|e| match e {
            crate::audit::chain::LineError::HashMismatch => {
                at("the record was edited: its hash does not match its content")
            }
            other => at(&format!("not a valid audit record ({other:?})")),
        })?;
        if i64::try_from(checked.seq).ok() != Some(row_seq) {
            return Err(at(&format!(
                "the row's seq column says {row_seq}, its record says {}",
                checked.seq
            )));
        }
        link(prev.as_ref(), &checked).map_err(|l| match l {
            Link::NotGenesis => at("the first record's prev is not 64 zeros"),
            Link::OutOfOrder { after } => at(&format!("out of order after seq {after}")),
            Link::Jump { from } => at(&format!(
                "seq jumps from {from} to {}: records were deleted",
                checked.seq
            )),
            Link::PrevMismatch => {
                at("prev does not match the record before it: a record was changed or deleted")
            }
        })?;
        report.first_seq.get_or_insert(checked.seq);
        report.last_seq = Some(checked.seq);
        report.records += 1;
        prev = Some((checked.seq, checked.line_hash));
        Ok(())
    })
    .await?;
    let head = client
        .query_one("SELECT seq, hash FROM keygate_audit_head WHERE id = 1", &[])
        .await
        .map_err(|e| DbError::from(e).to_string())?;
    let (head_seq, head_hash): (i64, String) = (head.get(0), head.get(1));
    let last = prev.map(|(seq, hash)| (i64::try_from(seq).unwrap_or(-1), hash));
    match last {
        Some((seq, hash)) if seq == head_seq && hash == head_hash => Ok(report),
        None if head_seq == 0 => Ok(report),
        Some((seq, _)) if seq < head_seq => Err(format!(
            "the chain's head is at seq {head_seq} but the last record is seq {seq}: records at the end were deleted"
        )),
        _ => Err(format!(
            "the chain's head (seq {head_seq}) does not match the last record: the head row or the last record was changed"
        )),
    }
}

/// Writes the trail as JSON Lines (every line as hashed, in `seq` order) from
/// `from_seq`; returns how many records.
pub async fn export(
    client: &impl GenericClient,
    from_seq: u64,
    out: &mut dyn Write,
) -> Result<u64, String> {
    let mut n = 0;
    let after = i64::try_from(from_seq.saturating_sub(1)).unwrap_or(i64::MAX);
    pages(client, after, |_, line| {
        out.write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| format!("cannot write: {e}"))?;
        n += 1;
        Ok(())
    })
    .await?;
    out.flush().map_err(|e| format!("cannot write: {e}"))?;
    Ok(n)
}

/// The lines of records matching `filter`, in `seq` order, at most `limit`.
pub async fn search(
    client: &impl GenericClient,
    filter: &crate::audit::search::Filter,
    limit: i64,
) -> Result<Vec<String>, String> {
    let since = filter.since.map(crate::rfc3339::format_millis);
    let until = filter.until.map(crate::rfc3339::format_millis);
    let rows = client
        .query(
            r#"SELECT line FROM keygate_audit
             WHERE ($1::text IS NULL OR client_id = $1)
               AND ($2::text IS NULL OR starts_with(path, $2))
               AND ($3::text IS NULL OR route = $3)
               AND ($4::text IS NULL OR event = $4)
               AND ($5::text IS NULL OR ts >= $5::timestamptz)
               AND ($6::text IS NULL OR ts < $6::timestamptz)
               AND (NOT $8 OR line LIKE '%"admin_key":true%')
             ORDER BY seq LIMIT $7"#,
            &[
                &filter.client_id,
                &filter.path_prefix,
                &filter.route,
                &filter.event,
                &since,
                &until,
                &limit,
                &filter.bypass,
            ],
        )
        .await
        .map_err(|e| DbError::from(e).to_string())?;
    // The same conditions again on the parsed record (the `LIKE` above is a
    // prefilter: in JSON text that member cannot occur inside a string).
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|line| filter.matches_line(line))
        .collect())
}
