//! Where bytes live: local paths and `file://`, `s3://`, `gs://`, `az://` and
//! `memory://` URLs, all through `object_store`. Local writes are atomic
//! (temporary name, fsync, rename, fsync of the directory); object-store puts
//! are atomic per object by the stores' own contract.
//!
//! Remote stores read their credentials and endpoints from the usual
//! environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`). Retries are bounded
//! (`SIGMA_STORE_RETRIES`, default 3; `SIGMA_STORE_TIMEOUT_S`, default 30) so an
//! unreachable store ends in an error naming the URL instead of a long hang.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use crate::error::{DataError, Result};
use crate::fsutil::{rename_durable, write_atomic};

/// A file or a directory-like prefix, local or in an object store.
#[derive(Clone)]
pub struct Location {
    /// What the user wrote (or its join with a file name); used in messages.
    pub url: String,
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    /// Set for local paths: writes go through std::fs for fsync + rename.
    local: Option<PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// The process-wide in-memory store behind `memory://NAME/...` URLs (tests).
pub fn memory_store(name: &str) -> Arc<InMemory> {
    let mut stores = memory_stores().lock().unwrap_or_else(|e| e.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

/// Accepted values of the store's environment variables (inclusive).
pub const STORE_RETRIES_RANGE: (u64, u64) = (0, 100);
pub const STORE_TIMEOUT_S_RANGE: (u64, u64) = (1, 86_400);

/// `SIGMA_STORE_RETRIES` and `SIGMA_STORE_TIMEOUT_S`, read and checked once per process.
#[derive(Clone, Copy, Debug)]
struct StoreEnv {
    retries: u64,
    timeout_s: u64,
}

/// The value of environment variable `name` (an integer in `range`), or
/// `default` when it is not set. Anything else is refused, never replaced.
pub fn env_in_range(name: &str, default: u64, range: (u64, u64)) -> Result<u64> {
    let (lo, hi) = range;
    let bad = |value: String, why: &str| DataError::Env {
        name: name.into(),
        value,
        message: format!(
            "{why}; set an integer from {lo} to {hi}, or unset it for the default {default}"
        ),
    };
    match crate::env::var(name) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            Ok(_) => Err(bad(v, "out of range")),
            Err(_) => Err(bad(v, "not a whole number")),
        },
    }
}

fn store_env() -> Result<StoreEnv> {
    static ENV: OnceLock<std::result::Result<StoreEnv, String>> = OnceLock::new();
    let read = || -> Result<StoreEnv> {
        Ok(StoreEnv {
            retries: env_in_range("SIGMA_STORE_RETRIES", 3, STORE_RETRIES_RANGE)?,
            timeout_s: env_in_range("SIGMA_STORE_TIMEOUT_S", 30, STORE_TIMEOUT_S_RANGE)?,
        })
    };
    ENV.get_or_init(|| read().map_err(|e| e.to_string()))
        .clone()
        .map_err(DataError::Other)
}

fn retry_config(env: StoreEnv) -> RetryConfig {
    RetryConfig {
        max_retries: env.retries as usize,
        retry_timeout: Duration::from_secs(env.timeout_s),
        ..Default::default()
    }
}

/// Connect and request timeouts, applied on top of whatever the environment
/// configured (so `AWS_ALLOW_HTTP` and friends keep working).
fn timeouts(env: StoreEnv) -> [(ClientConfigKey, String); 2] {
    let t = env.timeout_s;
    [
        (ClientConfigKey::ConnectTimeout, format!("{}s", t.min(10))),
        (ClientConfigKey::Timeout, format!("{}s", t * 4)),
    ]
}

/// True when `s` is a URL with a scheme sigma understands rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}

impl Location {
    /// Parse a local path or URL. Local paths need not exist yet.
    pub fn parse(s: &str) -> Result<Location> {
        // Checked for every location, local ones too: a wrong value is
        // refused where it is set, not when a remote store first needs it.
        let env = store_env()?;
        if s.is_empty() {
            return Err(DataError::store("\"\"", "empty path or URL"));
        }
        if !is_url(s) || s.starts_with("file://") {
            let p = s.strip_prefix("file://").unwrap_or(s);
            return Location::local(FsPath::new(p), s);
        }
        let url =
            url::Url::parse(s).map_err(|e| DataError::store(s, format!("not a valid URL: {e}")))?;
        let bucket = url.host_str().unwrap_or("").to_string();
        let path = ObjPath::from_url_path(url.path()).map_err(|e| DataError::store(s, e))?;
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "memory" => memory_store(&bucket),
            "s3" | "s3a" => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let b = AmazonS3Builder::from_env().with_bucket_name(&bucket).with_retry(retry_config(env));
                let b = timeouts(env).into_iter().fold(b, |b, (k, v)| b.with_config(AmazonS3ConfigKey::Client(k), v));
                Arc::new(b.build().map_err(|e| DataError::store(s, e))?)
            }
            "gs" => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&bucket).with_retry(retry_config(env));
                let b = timeouts(env).into_iter().fold(b, |b, (k, v)| b.with_config(GoogleConfigKey::Client(k), v));
                Arc::new(b.build().map_err(|e| DataError::store(s, e))?)
            }
            "az" | "abfs" | "azure" => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let b = MicrosoftAzureBuilder::from_env().with_url(s).with_retry(retry_config(env));
                let b = timeouts(env).into_iter().fold(b, |b, (k, v)| b.with_config(AzureConfigKey::Client(k), v));
                Arc::new(b.build().map_err(|e| DataError::store(s, e))?)
            }
            other => {
                return Err(DataError::store(
                    s,
                    format!("unsupported scheme `{other}://` (use a path, file://, s3://, gs://, az:// or memory://)"),
                ))
            }
        };
        Ok(Location {
            url: s.trim_end_matches('/').to_string(),
            store,
            path,
            local: None,
        })
    }

    fn local(p: &FsPath, shown: &str) -> Result<Location> {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| DataError::io("resolve the current directory for", p, e))?
                .join(p)
        };
        let abs = normalize(&abs);
        let path = ObjPath::from_absolute_path(&abs).map_err(|e| DataError::store(shown, e))?;
        Ok(Location {
            url: shown.trim_end_matches('/').to_string(),
            store: local_store(),
            path,
            local: Some(abs),
        })
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    pub fn local_path(&self) -> Option<&FsPath> {
        self.local.as_deref()
    }

    /// The last path component (file name).
    pub fn file_name(&self) -> String {
        self.path.filename().unwrap_or("").to_string()
    }

    /// A child of this location.
    pub fn join(&self, name: &str) -> Location {
        let mut path = self.path.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        Location {
            url: format!("{}/{}", self.url, name),
            store: self.store.clone(),
            path,
            local: self.local.as_ref().map(|l| l.join(name)),
        }
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    pub fn object_path(&self) -> &ObjPath {
        &self.path
    }

    pub async fn get(&self) -> Result<Bytes> {
        if let Some(p) = &self.local {
            let p = p.clone();
            return tokio::task::spawn_blocking(move || {
                std::fs::read(&p)
                    .map(Bytes::from)
                    .map_err(|e| DataError::io("read", p, e))
            })
            .await
            .map_err(|e| DataError::Other(e.to_string()))?;
        }
        let r = self.store.get(&self.path).await.map_err(|e| self.err(e))?;
        r.bytes().await.map_err(|e| self.err(e))
    }

    pub async fn get_range(&self, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path, range)
            .await
            .map_err(|e| self.err(e))
    }

    /// Size and sha256 (hex) of the object, read in pieces (memory stays small).
    pub async fn sha256(&self) -> Result<(u64, String)> {
        if let Some(p) = &self.local {
            let p = p.clone();
            return tokio::task::spawn_blocking(move || crate::fsutil::sha256_file(&p))
                .await
                .map_err(|e| DataError::Other(e.to_string()))?;
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut total = 0u64;
        let mut stream = self
            .store
            .get(&self.path)
            .await
            .map_err(|e| self.err(e))?
            .into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(|e| self.err(e))? {
            h.update(&chunk);
            total += chunk.len() as u64;
        }
        Ok((total, hex::encode(h.finalize())))
    }

    /// Size in bytes, or None when the object does not exist.
    pub async fn size(&self) -> Result<Option<u64>> {
        match self.store.head(&self.path).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// This location may be written as a command's new output (`--output`):
    /// locally a file name that is not a directory; anywhere, not an existing
    /// file unless `overwrite`.
    pub async fn check_new_output(&self, overwrite: bool) -> Result<()> {
        if let Some(p) = &self.local {
            crate::fsutil::check_file_target(p).map_err(|_| {
                DataError::flag(
                    "--output",
                    format!(
                        "{} is a directory or not a file name; give the path of a file",
                        self.url
                    ),
                )
            })?;
        }
        if !overwrite && self.size().await?.is_some() {
            return Err(DataError::flag(
                "--output",
                format!(
                    "{} already exists; pass --overwrite to replace it",
                    self.url
                ),
            ));
        }
        Ok(())
    }

    /// Write the whole object atomically.
    pub async fn put_atomic(&self, data: Bytes) -> Result<()> {
        if let Some(p) = &self.local {
            let p = p.clone();
            return tokio::task::spawn_blocking(move || write_atomic(&p, &data))
                .await
                .map_err(|e| DataError::Other(e.to_string()))?;
        }
        self.store
            .put(&self.path, PutPayload::from(data))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Upload (or move, when both are local) a finished local file to this location.
    pub async fn put_file(&self, file: &FsPath) -> Result<()> {
        if let Some(p) = &self.local {
            return rename_durable(file, p);
        }
        self.stream_from(file).await
    }

    /// Copy a local file to this location, leaving the file in place
    /// (locally: copy to a temporary name, fsync, rename).
    pub async fn copy_file(&self, file: &FsPath) -> Result<()> {
        if let Some(p) = &self.local {
            let (src, dst) = (file.to_path_buf(), p.clone());
            return tokio::task::spawn_blocking(move || crate::fsutil::copy_atomic(&src, &dst))
                .await
                .map_err(|e| DataError::Other(e.to_string()))?;
        }
        self.stream_from(file).await
    }

    async fn stream_from(&self, file: &FsPath) -> Result<()> {
        let mut upload =
            object_store::buffered::BufWriter::new(self.store.clone(), self.path.clone());
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| DataError::io("open", file, e))?;
        tokio::io::copy(&mut f, &mut upload)
            .await
            .map_err(|e| DataError::store(&self.url, e))?;
        tokio::io::AsyncWriteExt::shutdown(&mut upload)
            .await
            .map_err(|e| DataError::store(&self.url, e))?;
        Ok(())
    }

    pub async fn delete(&self) -> Result<()> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// All objects below this prefix, sorted by path, with their sizes.
    pub async fn list(&self) -> Result<Vec<(Location, u64)>> {
        if let Some(p) = &self.local {
            if p.is_file() {
                let len = std::fs::metadata(p)
                    .map_err(|e| DataError::io("stat", p, e))?
                    .len();
                return Ok(vec![(self.clone(), len)]);
            }
            if !p.exists() {
                return Ok(vec![]);
            }
        }
        let metas: Vec<_> = self
            .store
            .list(Some(&self.path))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<(Location, u64)> = metas
            .into_iter()
            .map(|m| {
                let rel = m
                    .location
                    .as_ref()
                    .strip_prefix(self.path.as_ref())
                    .unwrap_or(m.location.as_ref());
                (self.join(rel.trim_start_matches('/')), m.size)
            })
            .collect();
        out.sort_by(|a, b| a.0.url.cmp(&b.0.url));
        Ok(out)
    }

    fn err(&self, e: object_store::Error) -> DataError {
        match e {
            object_store::Error::NotFound { .. } => DataError::store(&self.url, "not found"),
            e => DataError::store(&self.url, flatten(&e)),
        }
    }
}

fn local_store() -> Arc<dyn ObjectStore> {
    static LOCAL: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    LOCAL
        .get_or_init(|| Arc::new(object_store::local::LocalFileSystem::new()))
        .clone()
}

/// An error and its sources on one line.
pub fn flatten(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn normalize(p: &FsPath) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// A process-wide tokio runtime for the synchronous entry points (CLI commands).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sigma-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

/// Run a future to completion from synchronous code.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Expand inputs (paths, directories, globs, URLs, URL globs) to a sorted list
/// of files with their sizes. A pattern that matches nothing is an error.
pub async fn expand_inputs(inputs: &[String]) -> Result<Vec<(Location, u64)>> {
    let mut out = Vec::new();
    for input in inputs {
        let wild = input.find(['*', '?', '[']);
        let found: Vec<(Location, u64)> = match wild {
            None => Location::parse(input)?.list().await?,
            Some(pos) => {
                let pattern = glob::Pattern::new(input)
                    .map_err(|e| DataError::input(input, format!("bad glob: {e}")))?;
                let base_str = &input[..input[..pos].rfind('/').map(|i| i + 1).unwrap_or(0)];
                let base = Location::parse(if base_str.is_empty() { "." } else { base_str })?;
                base.list()
                    .await?
                    .into_iter()
                    .filter(|(l, _)| {
                        let shown = if base_str.is_empty() {
                            l.url.trim_start_matches("./").to_string()
                        } else {
                            l.url.clone()
                        };
                        pattern.matches(&shown)
                    })
                    .collect()
            }
        };
        let found: Vec<_> = found
            .into_iter()
            .filter(|(l, _)| !l.file_name().starts_with('.'))
            .collect();
        if found.is_empty() {
            return Err(DataError::input(
                input,
                "no input files found (check the path, glob or URL)",
            ));
        }
        out.extend(found);
    }
    Ok(out)
}
