//! One connection to the store's database, SQLite or PostgreSQL, behind one small API: the
//! store's operations are written once, in the SQL both engines share (numbered parameters
//! `?1`, `ON CONFLICT`, `CASE`, a quoted `"user"`), and run on either.
//!
//! Values cross the API as `Value` (null, integer, text, bytes), so a row reads the same from
//! both engines. PostgreSQL is reached with `tokio-postgres`: its connection task runs on a
//! small runtime of its own ("poort-db") and a caller waits for its answer on its own thread,
//! so the store's synchronous operations work alike from the command line, the blocking pool
//! and the audit writer's thread.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake};

/// A value going into or coming out of the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no row")]
    NoRow,
    #[error("column {0}: {1}")]
    Type(usize, &'static str),
    #[error("{0}")]
    Value(String),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

/// What PostgreSQL said, not only "db error".
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}: {}", d.severity(), d.code().code(), d.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl Error {
    /// Whether a unique key or primary key refused the row.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            }
            Error::Postgres(e) => e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// Whether the connection is gone (the server stopped or restarted), not the statement.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Postgres(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Result<T>` of a single-row query, with "no row" as `None`.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRow) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What goes into a statement's parameters.
pub trait IntoValue {
    fn value(&self) -> Value;
}

impl IntoValue for Value {
    fn value(&self) -> Value {
        self.clone()
    }
}
impl IntoValue for i64 {
    fn value(&self) -> Value {
        Value::Int(*self)
    }
}
impl IntoValue for i32 {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl IntoValue for u32 {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl IntoValue for bool {
    fn value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl IntoValue for str {
    fn value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl IntoValue for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl IntoValue for [u8] {
    fn value(&self) -> Value {
        Value::Bytes(self.to_vec())
    }
}
impl IntoValue for Vec<u8> {
    fn value(&self) -> Value {
        Value::Bytes(self.clone())
    }
}
impl<const N: usize> IntoValue for [u8; N] {
    fn value(&self) -> Value {
        Value::Bytes(self.to_vec())
    }
}
impl<T: IntoValue + ?Sized> IntoValue for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
}
impl<T: IntoValue> IntoValue for Option<T> {
    fn value(&self) -> Value {
        self.as_ref().map_or(Value::Null, IntoValue::value)
    }
}

/// A statement's parameters: `params![a, b]`, `[a]`, or `()` for none.
pub trait Params {
    fn values(self) -> Vec<Value>;
}

impl Params for () {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}
impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}
impl Params for &[Value] {
    fn values(self) -> Vec<Value> {
        self.to_vec()
    }
}
impl<T: IntoValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(IntoValue::value).collect()
    }
}

/// Parameters of mixed types: `params![name, 3, Some(at)]`.
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        ::std::vec![$($crate::db::IntoValue::value(&$v)),*]
    };
}
pub(crate) use params;

/// What a column's value can be read as.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => Err("not an integer"),
        }
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        u32::try_from(i64::from_value(v)?).map_err(|_| "out of range")
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err("not text"),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        match v {
            Value::Bytes(b) => Ok(b.clone()),
            _ => Err("not bytes"),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Self, &'static str> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self.0.get(i).ok_or(Error::Type(i, "no such column"))?;
        T::from_value(v).map_err(|why| Error::Type(i, why))
    }

    /// The row's values, as they are.
    pub fn values(&self) -> &[Value] {
        &self.0
    }
}

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An open connection.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({:?})", self.backend())
    }
}

impl Conn {
    pub fn backend(&self) -> Backend {
        match self {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    /// Whether the connection can no longer be used (its server went away).
    pub fn is_broken(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(pg) => pg.client.is_closed() || pg.stuck.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let values = params.values();
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(values.iter().map(SqliteValue)))?)
            }
            Conn::Postgres(pg) => pg.execute(sql, &values),
        }
    }

    /// Runs several statements without parameters (a schema).
    pub fn batch(&self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(pg) => {
                let client = &pg.client;
                pg.answer(client.batch_execute(sql))??;
                Ok(())
            }
        }
    }

    /// All rows of a query, each turned into a `T` by `f`.
    pub fn query_map<T>(&self, sql: &str, params: impl Params, f: impl FnMut(&Row) -> Result<T>) -> Result<Vec<T>> {
        self.rows(sql, params, usize::MAX, f)
    }

    /// The first row of a query, turned into a `T` by `f`; `Error::NoRow` when there is none.
    pub fn query_row<T>(&self, sql: &str, params: impl Params, f: impl FnOnce(&Row) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        let mut out = self.rows(sql, params, 1, |r| f.take().map_or(Err(Error::NoRow), |f| f(r)))?;
        out.pop().ok_or(Error::NoRow)
    }

    /// Up to `limit` rows of a query (the rest are not read on SQLite), each turned into a
    /// `T` by `f`.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl Params,
        limit: usize,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        let values = params.values();
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(values.iter().map(SqliteValue)))?;
                let mut out = Vec::new();
                while out.len() < limit
                    && let Some(r) = rows.next()?
                {
                    out.push(f(&sqlite_row(r, n)?)?);
                }
                Ok(out)
            }
            Conn::Postgres(pg) => pg.query(sql, &values)?.iter().take(limit).map(f).collect(),
        }
    }

    /// Starts a transaction; it is rolled back unless committed. On SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`), so two processes never both read and then both write.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        match self.backend() {
            Backend::Sqlite => self.batch("BEGIN IMMEDIATE")?,
            Backend::Postgres => self.batch("BEGIN")?,
        }
        Ok(Tx { conn: self, done: false })
    }
}

/// A transaction in progress; it reads and writes like the connection.
pub struct Tx<'a> {
    conn: &'a mut Conn,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.conn.batch("COMMIT")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.conn.batch("ROLLBACK");
        }
    }
}

struct SqliteValue<'a>(&'a Value);

impl rusqlite::ToSql for SqliteValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match r.get_ref(i)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => Value::Int(f as i64),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
        });
    }
    Ok(Row(out))
}

// ---- PostgreSQL ----------------------------------------------------------------------------

/// A PostgreSQL connection and the statements it has prepared.
pub struct Pg {
    client: tokio_postgres::Client,
    statements: parking_lot::Mutex<HashMap<String, tokio_postgres::Statement>>,
    /// A statement went unanswered: the connection is given up (opened again by the store).
    stuck: std::sync::atomic::AtomicBool,
}

/// How long one statement may wait for the server. A server that stops answering without
/// closing the connection (a frozen link, a stopped process) makes callers fail after this,
/// rather than wait with them for ever.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The runtime the PostgreSQL connection tasks run on: one thread, whatever runtime (or none)
/// the callers are on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("poort-db")
            .enable_all()
            .build()
            .expect("invariant: a one-thread runtime can be built")
    })
}

/// Waits on this thread for a future that needs no runtime of its own (the client half of a
/// PostgreSQL connection: it only exchanges messages with the connection task), for at most
/// `limit`.
fn block_on_for<F: Future>(f: F, limit: std::time::Duration) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = crate::clock::instant() + limit;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(crate::clock::instant());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

/// How long connecting to the database may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Pg {
    /// Connects to `url`, with TLS when `tls` is given.
    pub fn connect(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Pg> {
        let mut config: tokio_postgres::Config = url.parse()?;
        if tls.is_some() {
            // A CA was configured: the connection is encrypted or not made.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        // A server that vanished without closing the connection is noticed.
        config
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(10))
            .keepalives_interval(std::time::Duration::from_secs(5))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("poort");
        }
        // The server's notices ("already exists, skipping") are not news to an operator.
        config.options("-c client_min_messages=warning");
        let (tx, rx) = std::sync::mpsc::channel();
        runtime().spawn(async move {
            let connected = match tls {
                None => tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tokio_postgres::NoTls)).await.map(|r| {
                    r.map(|(client, conn)| {
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::warn!(error = %e, "Database connection ended");
                            }
                        });
                        client
                    })
                }),
                Some(tls) => {
                    tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls::MakeRustls(tls))).await.map(|r| {
                        r.map(|(client, conn)| {
                            tokio::spawn(async move {
                                if let Err(e) = conn.await {
                                    tracing::warn!(error = %e, "Database connection ended");
                                }
                            });
                            client
                        })
                    })
                }
            };
            let _ = tx.send(connected);
        });
        match rx.recv() {
            Ok(Ok(Ok(client))) => {
                Ok(Pg { client, statements: parking_lot::Mutex::new(HashMap::new()), stuck: Default::default() })
            }
            Ok(Ok(Err(e))) => Err(Error::Unavailable(pg_message(&e))),
            Ok(Err(_)) => Err(Error::Unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
            Err(_) => Err(Error::Unavailable("the database runtime stopped".into())),
        }
    }

    /// The server's answer to `f`, or `Unavailable` (and the connection given up) when it
    /// does not come within `ANSWER_WITHIN`.
    fn answer<F: Future>(&self, f: F) -> Result<F::Output> {
        if self.stuck.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Unavailable("the connection stopped answering".into()));
        }
        block_on_for(f, ANSWER_WITHIN).ok_or_else(|| {
            self.stuck.store(true, std::sync::atomic::Ordering::Relaxed);
            Error::Unavailable(format!("no answer within {ANSWER_WITHIN:?}"))
        })
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        if let Some(s) = self.statements.lock().get(sql) {
            return Ok(s.clone());
        }
        let s = self.answer(self.client.prepare(&numbered(sql)))??;
        let mut m = self.statements.lock();
        if m.len() > 512 {
            m.clear();
        }
        m.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn execute(&self, sql: &str, values: &[Value]) -> Result<usize> {
        let stmt = self.statement(sql)?;
        let params = pg_params(&stmt, values)?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        Ok(self.answer(self.client.execute(&stmt, &refs))?? as usize)
    }

    fn query(&self, sql: &str, values: &[Value]) -> Result<Vec<Row>> {
        let stmt = self.statement(sql)?;
        let params = pg_params(&stmt, values)?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = self.answer(self.client.query(&stmt, &refs))??;
        rows.iter().map(pg_row).collect()
    }
}

/// The channel on which writers tell nodes that revocations or settings changed.
pub const CHANGES: &str = "poort_changes";

/// A task that listens for notifications; stopped when dropped.
pub struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wakes `changed` whenever a transaction on the database at `url` notifies `CHANGES`, and
/// after each (re)connection, since what was sent while it was down is lost (the caller's
/// own poll catches up then). Connects again by itself, a second after a loss.
pub fn listen(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    changed: Arc<tokio::sync::Notify>,
) -> Result<Listener> {
    let config: tokio_postgres::Config = url.parse()?;
    let task = runtime().spawn(async move {
        // Whether the last attempt got as far as listening: a failure is logged once per
        // outage, not once a second.
        let mut was_listening = true;
        loop {
            let mut listening = false;
            let ended = match &tls {
                None => match config.connect(tokio_postgres::NoTls).await {
                    Ok((client, conn)) => listen_on(client, conn, &changed, &mut listening).await,
                    Err(e) => Err(e),
                },
                Some(tls) => {
                    let mut config = config.clone();
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                    match config.connect(tls::MakeRustls(tls.clone())).await {
                        Ok((client, conn)) => listen_on(client, conn, &changed, &mut listening).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if was_listening || listening {
                match ended {
                    Err(e) => tracing::warn!(error = %e, "Listening for changes on the database stopped; polling until it is back"),
                    Ok(()) => tracing::warn!("Listening for changes on the database stopped; polling until it is back"),
                }
            }
            was_listening = listening;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    Ok(Listener(task))
}

/// Listens on one connection until it ends.
async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    changed: &tokio::sync::Notify,
    listened: &mut bool,
) -> std::result::Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let statement = format!("LISTEN {CHANGES}");
    let mut listening = std::pin::pin!(client.batch_execute(&statement));
    loop {
        // The connection must be driven for the LISTEN to be sent and answered.
        let message = std::future::poll_fn(|cx| {
            if !*listened && let Poll::Ready(r) = listening.as_mut().poll(cx) {
                *listened = true;
                return Poll::Ready(Some(r.map(|()| None)));
            }
            conn.poll_message(cx).map(|m| m.map(|m| m.map(Some)))
        })
        .await;
        match message {
            Some(Ok(None)) => changed.notify_one(), // Listening: catch up on what was missed.
            Some(Ok(Some(tokio_postgres::AsyncMessage::Notification(_)))) => changed.notify_one(),
            Some(Ok(Some(_))) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

/// Rewrites `?N` parameters as PostgreSQL's `$N`, outside quoted text.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    for ch in sql.chars() {
        match (quote, ch) {
            (None, '\'' | '"') => quote = Some(ch),
            (Some(q), c) if c == q => quote = None,
            (None, '?') => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(ch);
    }
    out
}

/// One parameter, encoded as the type PostgreSQL expects in its place.
#[derive(Debug)]
struct PgParam(Value);

impl tokio_postgres::types::ToSql for PgParam {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be sent as {ty}").into()),
            },
            Value::Text(s) => s.to_sql(ty, out),
            Value::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn pg_params(stmt: &tokio_postgres::Statement, values: &[Value]) -> Result<Vec<PgParam>> {
    if stmt.params().len() != values.len() {
        return Err(Error::Value(format!(
            "the statement takes {} parameters, {} given",
            stmt.params().len(),
            values.len()
        )));
    }
    Ok(values.iter().cloned().map(PgParam).collect())
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row> {
    use tokio_postgres::types::Type;
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into())),
            Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into())),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into())),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                r.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            _ => return Err(Error::Type(i, "a column type poort does not read")),
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// TLS to the database with poort's own TLS client configuration.
mod tls {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = std::io::Error;

        fn make_tls_connect(&mut self, host: &str) -> std::io::Result<Connect> {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Ok(Connect { config: self.0.clone(), name })
        }
    }

    pub struct Connect {
        config: Arc<rustls::ClientConfig>,
        name: rustls_pki_types::ServerName<'static>,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
        type Stream = Stream<S>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            Box::pin(async move {
                let s = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
                Ok(Stream(s))
            })
        }
    }

    pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, data)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_outside_quotes() {
        assert_eq!(
            numbered("SELECT '?1', \"a?\" FROM t WHERE x = ?1 AND y = ?12"),
            "SELECT '?1', \"a?\" FROM t WHERE x = $1 AND y = $12"
        );
    }
}
