//! The rendezvous store: a small TCP key-value server on tokio (set, get,
//! wait, add, delete, heartbeats) and a blocking client. Every connection must
//! first present the job secret; a peer without it is refused, so nobody else
//! can join the job or poison its communicator ids. Every wait has a timeout
//! that ends in an error naming what was awaited.
//!
//! Wire format, both directions: `u32 length (LE) | u8 code | body`. Strings
//! and byte values in a body are `u32 length | bytes`.
//!
//! Namespaces: a client may live in a namespace (a key prefix it adds to
//! every key, sent in its hello). Heartbeats are kept per namespace too, so
//! the attempts of a job that `sigma launch --max-restarts` starts again on
//! one store never see each other's keys or heartbeats.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::{Result, TrainError};

const HELLO: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 2;
const WAIT: u8 = 3;
const ADD: u8 = 4;
const DELETE: u8 = 5;
const HEARTBEAT: u8 = 6;
const DEAD: u8 = 7;
const OK: u8 = 0;
const ERR: u8 = 1;
/// A wait ended at its deadline (the keys may still come).
const TIMEOUT: u8 = 2;
const MAX_FRAME: u32 = 1 << 30;
/// Longest single wait request; the client re-checks the job's stop request between them.
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// Every request is answered within a wait slice; a reply (or a send) that
/// takes this long means the store's host is gone without closing the
/// connection (a machine that vanished), which must not hang the rank.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);
impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_le_bytes(h.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        let (h, t) = self.0.split_at_checked(8)?;
        self.0 = t;
        Some(i64::from_le_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A rank's liveness as the store sees it.
struct Beat {
    /// Its last heartbeat.
    at: Instant,
    /// Its liveness connection has closed.
    gone: bool,
}

/// Causes in a DEAD reply.
const SILENT: u8 = 0;
const GONE: u8 = 1;

#[derive(Default)]
struct State {
    data: Mutex<HashMap<String, Vec<u8>>>,
    changed: Notify,
    /// Liveness per (namespace, rank).
    heartbeats: Mutex<HashMap<(String, u32), Beat>>,
}

impl State {
    fn data(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn beats(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Beat>> {
        self.heartbeats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running store server; it stops when dropped.
pub struct StoreServer {
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl StoreServer {
    /// Listen on `bind` (e.g. "0.0.0.0:29500"; port 0 picks a free one).
    pub fn start(bind: &str, secret: &str) -> Result<StoreServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sigma-store")
            .enable_all()
            .build()
            .map_err(|e| TrainError::Store {
                addr: bind.to_string(),
                message: format!("cannot start its runtime: {e}"),
            })?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .map_err(|e| TrainError::Store {
                addr: bind.to_string(),
                message: format!("cannot listen: {e}"),
            })?;
        let addr = listener.local_addr().map_err(|e| TrainError::Store {
            addr: bind.to_string(),
            message: format!("no local address: {e}"),
        })?;
        let state = Arc::new(State::default());
        let secret = secret.as_bytes().to_vec();
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (st, sec) = (state.clone(), secret.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, st, sec).await;
                });
            }
        });
        Ok(StoreServer { addr, _rt: rt })
    }
}

async fn read_frame(s: &mut tokio::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let len = s.read_u32_le().await?;
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::other("bad frame length"));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await?;
    Ok((buf[0], buf[1..].to_vec()))
}

async fn write_frame(s: &mut tokio::net::TcpStream, code: u8, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(code);
    out.extend_from_slice(body);
    s.write_all(&out).await
}

/// What a connection is, once authenticated.
struct Conn {
    rank: u32,
    ns: String,
    /// It has sent heartbeats: it is its rank's liveness connection.
    heartbeats: bool,
}

/// Serve one connection: the hello with the job secret, then requests until
/// it closes. When a rank's liveness connection closes, the rank is marked
/// gone at once (a killed process's sockets are closed by its kernel), so
/// the others need not wait out the heartbeat timeout; a rank that finishes
/// or fails says so through keys first (`liveness`).
async fn serve(
    mut sock: tokio::net::TcpStream,
    st: Arc<State>,
    secret: Vec<u8>,
) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let Some((rank, ns)) = authenticate(&mut sock, &secret).await? else {
        return Ok(());
    };
    let mut conn = Conn {
        rank,
        ns,
        heartbeats: false,
    };
    let r = requests(&mut sock, &st, &mut conn).await;
    if conn.heartbeats {
        if let Some(b) = st.beats().get_mut(&(conn.ns, conn.rank)) {
            b.gone = true;
        }
    }
    r
}

/// The hello: the job secret, the rank and the namespace (None: refused,
/// and told why), with a deadline so idle strangers do not hold a task.
async fn authenticate(
    sock: &mut tokio::net::TcpStream,
    secret: &[u8],
) -> std::io::Result<Option<(u32, String)>> {
    let hello = tokio::time::timeout(Duration::from_secs(10), read_frame(sock)).await;
    let Ok(Ok((HELLO, body))) = hello else {
        write_frame(sock, ERR, b"expected hello with the job secret").await?;
        return Ok(None);
    };
    let mut r = Reader(&body);
    let (s, rank, ns) = (
        r.bytes().unwrap_or_default().to_vec(),
        r.u32().unwrap_or(u32::MAX),
        r.string().unwrap_or_default(),
    );
    if !constant_time_eq(&s, secret) {
        write_frame(sock, ERR, b"wrong job secret: connection refused").await?;
        return Ok(None);
    }
    write_frame(sock, OK, &[]).await?;
    Ok(Some((rank, ns)))
}

/// Answer requests until the connection closes (or sends a bad one).
async fn requests(
    sock: &mut tokio::net::TcpStream,
    st: &State,
    conn: &mut Conn,
) -> std::io::Result<()> {
    loop {
        let (op, body) = read_frame(sock).await?;
        let mut r = Reader(&body);
        let (code, reply): (u8, Vec<u8>) = match op {
            SET => {
                let (Some(k), Some(v)) = (r.string(), r.bytes()) else {
                    return write_frame(sock, ERR, b"bad set").await;
                };
                st.data().insert(k, v.to_vec());
                st.changed.notify_waiters();
                (OK, Vec::new())
            }
            GET => {
                let k = r.string().unwrap_or_default();
                let v = st.data().get(&k).cloned();
                match v {
                    Some(v) => (OK, v),
                    None => (ERR, format!("no key {k}").into_bytes()),
                }
            }
            WAIT => wait_keys(st, &mut r).await,
            ADD => {
                let (k, delta) = (r.string().unwrap_or_default(), r.i64().unwrap_or(0));
                let v = {
                    let mut d = st.data();
                    let cur = d
                        .get(&k)
                        .and_then(|v| v.as_slice().try_into().ok())
                        .map(i64::from_le_bytes)
                        .unwrap_or(0);
                    d.insert(k, (cur + delta).to_le_bytes().to_vec());
                    cur + delta
                };
                st.changed.notify_waiters();
                (OK, v.to_le_bytes().to_vec())
            }
            DELETE => {
                st.data().remove(&r.string().unwrap_or_default());
                (OK, Vec::new())
            }
            HEARTBEAT => {
                conn.heartbeats = true;
                st.beats().insert(
                    (conn.ns.clone(), conn.rank),
                    Beat {
                        at: Instant::now(),
                        gone: false,
                    },
                );
                (OK, Vec::new())
            }
            DEAD => (OK, lost(st, &conn.ns, r.u32().unwrap_or(0))),
            _ => return write_frame(sock, ERR, b"unknown operation").await,
        };
        write_frame(sock, code, &reply).await?;
    }
}

/// WAIT: until every key exists (OK) or the request's deadline (TIMEOUT, naming the missing keys).
async fn wait_keys(st: &State, r: &mut Reader<'_>) -> (u8, Vec<u8>) {
    let ms = r.u32().unwrap_or(0) as u64;
    let n = r.u32().unwrap_or(0);
    let keys: Vec<String> = (0..n).filter_map(|_| r.string()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let notified = st.changed.notified();
        let missing: Vec<String> = {
            let d = st.data();
            keys.iter()
                .filter(|k| !d.contains_key(*k))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return (OK, Vec::new());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let msg = format!("timed out waiting for {}", missing.join(", "));
            return (TIMEOUT, msg.into_bytes());
        }
    }
}

/// DEAD: the ranks of namespace `ns` that are lost, as `u32 rank | u8 cause`
/// entries: `GONE` (their liveness connection closed) at once, `SILENT` (no
/// heartbeat for `ms` milliseconds) otherwise.
fn lost(st: &State, ns: &str, ms: u32) -> Vec<u8> {
    let silent = Duration::from_millis(u64::from(ms));
    let mut out = Vec::new();
    for ((n, rank), b) in st.beats().iter() {
        let cause = if b.gone {
            GONE
        } else if b.at.elapsed() > silent {
            SILENT
        } else {
            continue;
        };
        if n == ns {
            out.extend_from_slice(&rank.to_le_bytes());
            out.push(cause);
        }
    }
    out
}

/// A rank the store counts as lost (`StoreClient::lost_ranks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostRank {
    pub rank: u32,
    /// Its liveness connection closed (else: it fell silent).
    pub disconnected: bool,
}

/// A blocking client, one TCP connection.
pub struct StoreClient {
    sock: TcpStream,
    pub addr: String,
    /// Prefix of every key this client uses (its namespace).
    prefix: String,
    /// Default timeout of waits and of connecting.
    pub timeout: Duration,
}

impl StoreClient {
    /// Connect (retrying until `timeout`) and authenticate as `rank`.
    pub fn connect(addr: &str, secret: &str, rank: u32, timeout: Duration) -> Result<StoreClient> {
        StoreClient::connect_in(addr, secret, rank, timeout, "")
    }

    /// Connect as `rank` of namespace `prefix` (prepended to every key).
    pub fn connect_in(
        addr: &str,
        secret: &str,
        rank: u32,
        timeout: Duration,
        prefix: &str,
    ) -> Result<StoreClient> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(TrainError::Store {
                        addr: addr.to_string(),
                        message: format!(
                            "cannot connect within {timeout:?}: {e} (is rank 0 / the launcher running, and MASTER_ADDR/MASTER_PORT right?)"
                        ),
                    })
                }
            }
        };
        let _ = sock.set_nodelay(true);
        let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
        let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
        let mut c = StoreClient {
            sock,
            addr: addr.to_string(),
            prefix: prefix.to_string(),
            timeout,
        };
        let mut body = Vec::new();
        put_bytes(&mut body, secret.as_bytes());
        body.extend_from_slice(&rank.to_le_bytes());
        put_bytes(&mut body, prefix.as_bytes());
        c.call(HELLO, &body, "hello")?;
        Ok(c)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn call(&mut self, op: u8, body: &[u8], what: &str) -> Result<Vec<u8>> {
        match self.call_raw(op, body, what)? {
            (OK, v) => Ok(v),
            (_, v) => Err(TrainError::Store {
                addr: self.addr.clone(),
                message: format!("{what}: {}", String::from_utf8_lossy(&v)),
            }),
        }
    }

    /// One request; the reply's code and body.
    fn call_raw(&mut self, op: u8, body: &[u8], what: &str) -> Result<(u8, Vec<u8>)> {
        let err = |m: String| TrainError::Store {
            addr: self.addr.clone(),
            message: format!("{what}: {m} (is the store's host, rank 0 or the launcher, gone?)"),
        };
        let mut out = Vec::with_capacity(body.len() + 5);
        out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        out.push(op);
        out.extend_from_slice(body);
        self.sock
            .write_all(&out)
            .map_err(|e| err(format!("connection lost: {e}")))?;
        let mut len = [0u8; 4];
        self.sock.read_exact(&mut len).map_err(|e| {
            err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no reply within {IO_TIMEOUT:?}")
                }
                _ => format!("connection lost: {e}"),
            })
        })?;
        let n = u32::from_le_bytes(len);
        if n == 0 || n > MAX_FRAME {
            return Err(err("bad reply".into()));
        }
        let mut buf = vec![0u8; n as usize];
        self.sock
            .read_exact(&mut buf)
            .map_err(|e| err(format!("connection lost: {e}")))?;
        Ok((buf[0], buf[1..].to_vec()))
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut b = Vec::new();
        put_bytes(&mut b, self.full(key).as_bytes());
        put_bytes(&mut b, value);
        self.call(SET, &b, &format!("set {key}")).map(|_| ())
    }

    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        put_bytes(&mut b, self.full(key).as_bytes());
        self.call(GET, &b, &format!("get {key}"))
    }

    /// Block until every key exists, or fail after `timeout` naming the missing keys.
    /// The wait is made in slices of at most `WAIT_SLICE`; between them the
    /// job's stop request (`abort`: a lost peer or store) ends it with that reason.
    pub fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(WAIT_SLICE);
            let mut b = Vec::new();
            b.extend_from_slice(&(slice.as_millis().min(u32::MAX as u128) as u32).to_le_bytes());
            b.extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for k in keys {
                put_bytes(&mut b, self.full(k).as_bytes());
            }
            match self.call_raw(WAIT, &b, "wait")? {
                (OK, _) => return Ok(()),
                (TIMEOUT, v) => {
                    super::abort::check()?;
                    if Instant::now() >= deadline {
                        return Err(TrainError::Store {
                            addr: self.addr.clone(),
                            message: format!(
                                "wait: {} (after {timeout:?})",
                                String::from_utf8_lossy(&v)
                            ),
                        });
                    }
                }
                (_, v) => {
                    return Err(TrainError::Store {
                        addr: self.addr.clone(),
                        message: format!("wait: {}", String::from_utf8_lossy(&v)),
                    })
                }
            }
        }
    }

    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let mut b = Vec::new();
        put_bytes(&mut b, self.full(key).as_bytes());
        b.extend_from_slice(&delta.to_le_bytes());
        let v = self.call(ADD, &b, &format!("add {key}"))?;
        Ok(i64::from_le_bytes(v.as_slice().try_into().map_err(
            |_| TrainError::Store {
                addr: self.addr.clone(),
                message: format!("add {key}: a reply of {} bytes, not 8", v.len()),
            },
        )?))
    }

    pub fn delete(&mut self, key: &str) -> Result<()> {
        let mut b = Vec::new();
        put_bytes(&mut b, self.full(key).as_bytes());
        self.call(DELETE, &b, &format!("delete {key}")).map(|_| ())
    }

    /// All `world` participants arrive at barrier `name` (fails after the timeout).
    pub fn barrier(&mut self, name: &str, world: usize) -> Result<()> {
        let n = self.add(&format!("barrier/{name}/count"), 1)?;
        let done = format!("barrier/{name}/done");
        if n as usize == world {
            self.set(&done, b"1")?;
        }
        let t = self.timeout;
        self.wait(&[done], t).map_err(|e| {
            let why = match e {
                TrainError::Store { message, .. } => message,
                e => e.to_string(),
            };
            TrainError::Store {
                addr: self.addr.clone(),
                message: format!("barrier `{name}` ({world} participants): {why}"),
            }
        })
    }

    pub fn heartbeat(&mut self) -> Result<()> {
        self.call(HEARTBEAT, &[], "heartbeat").map(|_| ())
    }

    /// Ranks of this namespace that are lost, by rank: those whose liveness
    /// connection closed (at once) and those whose last heartbeat is older
    /// than `timeout`. A rank that finished cleanly is among them once its
    /// connection closes: callers tell it apart by what it left in the store.
    pub fn lost_ranks(&mut self, timeout: Duration) -> Result<Vec<LostRank>> {
        let v = self.call(
            DEAD,
            &(timeout.as_millis().min(u32::MAX as u128) as u32).to_le_bytes(),
            "liveness",
        )?;
        let mut out: Vec<LostRank> = v
            .chunks_exact(5)
            .map(|c| LostRank {
                rank: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                disconnected: c[4] == GONE,
            })
            .collect();
        out.sort_by_key(|l| l.rank);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_wait_add_barrier_and_secret() {
        let server = StoreServer::start("127.0.0.1:0", "s3cret").expect("store");
        let addr = server.addr.to_string();
        let t = Duration::from_secs(5);
        let mut a = StoreClient::connect(&addr, "s3cret", 0, t).expect("store");
        let addr2 = addr.clone();
        let waiter = std::thread::spawn(move || {
            let mut b = StoreClient::connect(&addr2, "s3cret", 1, t).expect("store");
            b.wait(&["k".into()], t).expect("store");
            let v = b.get("k").expect("store");
            b.barrier("end", 2).expect("store");
            v
        });
        std::thread::sleep(Duration::from_millis(100));
        a.set("k", b"value").expect("store");
        assert_eq!(a.add("n", 2).expect("store"), 2);
        assert_eq!(a.add("n", 3).expect("store"), 5);
        a.barrier("end", 2).expect("store");
        assert_eq!(waiter.join().expect("store"), b"value");
        let e = a
            .wait(&["never".into()], Duration::from_millis(200))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("never") && e.contains("timed out"), "{e}");
        let e = StoreClient::connect(&addr, "wrong", 2, t)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("wrong job secret"), "{e}");
        a.heartbeat().expect("store");
        std::thread::sleep(Duration::from_millis(150));
        let silent = LostRank {
            rank: 0,
            disconnected: false,
        };
        assert_eq!(
            a.lost_ranks(Duration::from_millis(100)).expect("store"),
            vec![silent]
        );
        // Another namespace sees neither the keys nor the heartbeats of the first.
        let mut n = StoreClient::connect_in(&addr, "s3cret", 0, t, "attempt1/").expect("store");
        assert!(n.get("k").is_err());
        n.set("k", b"other").expect("store");
        assert_eq!(a.get("k").expect("store"), b"value");
        assert_eq!(
            n.lost_ranks(Duration::from_millis(100)).expect("store"),
            Vec::<LostRank>::new()
        );
    }

    #[test]
    fn a_closed_liveness_connection_is_a_lost_rank_at_once() {
        let server = StoreServer::start("127.0.0.1:0", "s").expect("store");
        let addr = server.addr.to_string();
        let t = Duration::from_secs(5);
        let long = Duration::from_secs(3600);
        let mut watcher = StoreClient::connect_in(&addr, "s", 0, t, "ns/").expect("store");
        watcher.heartbeat().expect("store");
        // Rank 1 heartbeats, rank 2 never does (a control connection); both close.
        let mut r1 = StoreClient::connect_in(&addr, "s", 1, t, "ns/").expect("store");
        r1.heartbeat().expect("store");
        let r2 = StoreClient::connect_in(&addr, "s", 2, t, "ns/").expect("store");
        // Another attempt's rank 1 stays connected.
        let mut other = StoreClient::connect_in(&addr, "s", 1, t, "other/").expect("store");
        other.heartbeat().expect("store");
        assert!(watcher.lost_ranks(long).expect("store").is_empty());
        drop((r1, r2));
        let t0 = Instant::now();
        let gone = LostRank {
            rank: 1,
            disconnected: true,
        };
        loop {
            let lost = watcher.lost_ranks(long).expect("store");
            if !lost.is_empty() {
                assert_eq!(lost, vec![gone]);
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the closed connection was not seen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(other.lost_ranks(long).expect("store").is_empty());
    }
}
