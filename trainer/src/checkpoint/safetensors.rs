//! The safetensors file format, the part sigma uses: little-endian u64 header
//! length, a JSON header (`__metadata__` string map, and per tensor its dtype,
//! shape and `[begin, end)` byte offsets into the data section), padded with
//! spaces to a multiple of 8, then the data. Written in one pass with an
//! xxh3-64 of every byte, so a shard is checksummed as it is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Result, TrainError};

fn dtype_name(k: Kind) -> Result<&'static str> {
    Ok(match k {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        k => {
            return Err(TrainError::internal_state(format!(
                "safetensors: no dtype name for {k:?}"
            )))
        }
    })
}

fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        _ => return None,
    })
}

/// What `write` produced.
pub struct Written {
    pub bytes: u64,
    /// xxh3-64 of the whole file.
    pub file_hash: u64,
    /// xxh3-64 of each tensor's data, in the order given.
    pub tensor_hashes: Vec<u64>,
}

/// Writes `(name, tensor)` pairs (CPU tensors, any shape) to `path` and fsyncs it.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Written> {
    let io = |e| TrainError::io(path.display().to_string(), e);
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut off = 0u64;
    for (name, t) in tensors {
        let n = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        header.insert(
            name.clone(),
            json!({"dtype": dtype_name(t.kind())?, "shape": t.size(), "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut hash = Xxh3::new();
    let mut w = BufWriter::with_capacity(8 << 20, File::create(path).map_err(io)?);
    let mut put = |b: &[u8], w: &mut BufWriter<File>| -> Result<()> {
        hash.update(b);
        w.write_all(b).map_err(io)
    };
    put(&(h.len() as u64).to_le_bytes(), &mut w)?;
    put(&h, &mut w)?;
    let mut buf = Vec::new();
    let mut tensor_hashes = Vec::with_capacity(tensors.len());
    for (_, t) in tensors {
        let t = t.contiguous();
        buf.resize(t.numel() * t.kind().elt_size_in_bytes(), 0);
        t.copy_data_u8(&mut buf, t.numel());
        tensor_hashes.push(xxhash_rust::xxh3::xxh3_64(&buf));
        put(&buf, &mut w)?;
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(Written {
        bytes: 8 + h.len() as u64 + off,
        file_hash: hash.digest(),
        tensor_hashes,
    })
}

/// One tensor's entry in a file's header.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in the file.
    pub begin: u64,
    pub end: u64,
}

/// An opened file: its header, checked against the file's length.
pub struct Reader {
    file: File,
    path: String,
    pub entries: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader> {
        let p = path.display().to_string();
        let bad = |m: String| TrainError::file(&p, format!("not a valid safetensors file: {m}"));
        let mut file = File::open(path).map_err(|e| TrainError::io(p.clone(), e))?;
        let len = file
            .metadata()
            .map_err(|e| TrainError::io(p.clone(), e))?
            .len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad(format!("only {len} bytes (truncated?)")))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(bad(format!(
                "header of {n} bytes in a file of {len} (truncated?)"
            )));
        }
        let mut h = vec![0u8; n as usize];
        file.read_exact(&mut h)
            .map_err(|e| TrainError::io(p.clone(), e))?;
        let header: BTreeMap<String, Value> =
            serde_json::from_slice(&h).map_err(|e| bad(format!("header: {e}")))?;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut data_end = 0;
        for (name, v) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(v).map_err(|e| bad(format!("metadata: {e}")))?;
                continue;
            }
            let kind = v["dtype"]
                .as_str()
                .and_then(dtype_kind)
                .ok_or_else(|| bad(format!("{name}: unsupported dtype {}", v["dtype"])))?;
            let shape: Vec<i64> = serde_json::from_value(v["shape"].clone())
                .map_err(|e| bad(format!("{name}: shape: {e}")))?;
            let offs: [u64; 2] = serde_json::from_value(v["data_offsets"].clone())
                .map_err(|e| bad(format!("{name}: data_offsets: {e}")))?;
            let want = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
            if offs[1] < offs[0] || offs[1] - offs[0] != want {
                return Err(bad(format!(
                    "{name}: {} bytes for shape {shape:?}",
                    offs[1].saturating_sub(offs[0])
                )));
            }
            data_end = data_end.max(offs[1]);
            entries.insert(
                name,
                Entry {
                    kind,
                    shape,
                    begin: 8 + n + offs[0],
                    end: 8 + n + offs[1],
                },
            );
        }
        if 8 + n + data_end != len {
            return Err(bad(format!(
                "{len} bytes on disk but the header describes {} (truncated or padded)",
                8 + n + data_end
            )));
        }
        Ok(Reader {
            file,
            path: p,
            entries,
            metadata,
        })
    }

    /// Elements `[start, end)` of tensor `name` (flattened), as a 1-D CPU tensor.
    pub fn read_range(&mut self, name: &str, start: i64, end: i64) -> Result<Tensor> {
        let (buf, kind) = self.read_bytes(name, start, end)?;
        Ok(Tensor::from_data_size(&buf, &[end - start], kind))
    }

    /// The raw little-endian bytes of elements `[start, end)` of tensor `name`.
    pub fn read_bytes(&mut self, name: &str, start: i64, end: i64) -> Result<(Vec<u8>, Kind)> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| TrainError::file(&self.path, format!("no tensor `{name}`")))?;
        let es = e.kind.elt_size_in_bytes() as u64;
        let (b, kind) = (e.begin + start as u64 * es, e.kind);
        if e.begin + end as u64 * es > e.end || start > end {
            return Err(TrainError::file(
                &self.path,
                format!("`{name}` has no elements {start}..{end}"),
            ));
        }
        let mut buf = vec![0u8; ((end - start) as u64 * es) as usize];
        self.file
            .seek(SeekFrom::Start(b))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| TrainError::io(self.path.clone(), e))?;
        Ok((buf, kind))
    }

    /// A whole tensor, in its shape.
    pub fn read(&mut self, name: &str) -> Result<Tensor> {
        let shape = self
            .entries
            .get(name)
            .map(|e| e.shape.clone())
            .ok_or_else(|| TrainError::file(&self.path, format!("no tensor `{name}`")))?;
        let n: i64 = shape.iter().product();
        Ok(self.read_range(name, 0, n)?.view(shape.as_slice()))
    }
}

/// xxh3-64 of a whole file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, u64)> {
    let io = |e| TrainError::io(path.display().to_string(), e);
    let mut f = File::open(path).map_err(io)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, h.digest()))
}
