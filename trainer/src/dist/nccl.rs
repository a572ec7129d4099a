//! The NCCL backend of `Collectives`, for tensors on GPUs: NCCL (loaded at run
//! time through cudarc; the very libnccl that libtorch loaded, see
//! `nccl_library_dir`) called on the tensors' own device pointers, on the
//! default CUDA stream, so it is ordered after the compute that produced them.
//!
//! A collective that hangs (a dead peer, a mismatched call) must not hang the
//! job: each call is followed by a device synchronisation while a watchdog
//! thread is armed; past the timeout the watchdog prints the group, operation
//! and rank and exits the process with code 1.
#![allow(unsafe_code)] // FFI: NCCL and the CUDA runtime on raw tensor pointers.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::nccl::sys as nccl;
use cudarc::runtime::sys as cuda;
use tch::{Kind, Tensor};

use super::collectives::Collectives;
use super::store::StoreClient;
use crate::error::{Result, TrainError};

fn dtype(k: Kind) -> Result<nccl::ncclDataType_t> {
    Ok(match k {
        Kind::Float => nccl::ncclDataType_t::ncclFloat32,
        Kind::Double => nccl::ncclDataType_t::ncclFloat64,
        Kind::BFloat16 => nccl::ncclDataType_t::ncclBfloat16,
        Kind::Half => nccl::ncclDataType_t::ncclFloat16,
        Kind::Int64 => nccl::ncclDataType_t::ncclInt64,
        Kind::Int => nccl::ncclDataType_t::ncclInt32,
        k => return Err(TrainError::Other(format!("NCCL: unsupported dtype {k:?}"))),
    })
}

fn check(r: nccl::ncclResult_t, what: &str) -> Result<()> {
    if r == nccl::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    let msg = unsafe { CStr::from_ptr(nccl::ncclGetErrorString(r)) }
        .to_string_lossy()
        .into_owned();
    Err(TrainError::Other(format!("NCCL {what}: {msg} ({r:?})")))
}

fn cuda_check(r: cuda::cudaError_t, what: &str) -> Result<()> {
    if r == cuda::cudaError_t::cudaSuccess {
        Ok(())
    } else {
        Err(TrainError::Other(format!("CUDA {what}: {r:?}")))
    }
}

/// Directory holding a `libnccl.so` link to the libnccl.so.2 this process has
/// loaded (cudarc looks for `libnccl.so`, and a different NCCL than libtorch's
/// breaks communicators). `sigma launch` puts it first on the ranks' LD_LIBRARY_PATH.
/// The same holds for the CUDA runtime (`libcudart.so`), whose current device
/// NCCL and libtorch must share.
pub fn nccl_library_dir(base: &std::path::Path) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let dir = base.join(".nccl");
    std::fs::create_dir_all(&dir).ok()?;
    let mut any = false;
    for (needle, name) in [
        ("libnccl.so", "libnccl.so"),
        ("libcudart.so", "libcudart.so"),
    ] {
        if let Some(lib) = paths.iter().find(|p| p.contains(needle)) {
            let link = dir.join(name);
            let _ = std::fs::remove_file(&link);
            any |= std::os::unix::fs::symlink(lib, &link).is_ok();
        }
    }
    any.then_some(dir)
}

struct Watchdog {
    /// Deadline (ms since `epoch`) of the collective in flight; 0 when idle.
    deadline_ms: Arc<AtomicU64>,
    what: Arc<Mutex<String>>,
    epoch: Instant,
}

impl Watchdog {
    fn start() -> Watchdog {
        let deadline_ms = Arc::new(AtomicU64::new(0));
        let what = Arc::new(Mutex::new(String::new()));
        let epoch = Instant::now();
        let (d, w) = (deadline_ms.clone(), what.clone());
        std::thread::Builder::new()
            .name("sigma-nccl-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let dl = d.load(Ordering::Relaxed);
                if dl != 0 && epoch.elapsed().as_millis() as u64 > dl {
                    eprintln!("error: {} did not complete in time: a peer is lost or called a different collective; exiting", w.lock().map(|s| s.clone()).unwrap_or_default());
                    std::process::exit(1);
                }
            })
            .expect("watchdog thread");
        Watchdog {
            deadline_ms,
            what,
            epoch,
        }
    }
    fn arm(&self, what: String, timeout: Duration) {
        if let Ok(mut w) = self.what.lock() {
            *w = what;
        }
        self.deadline_ms.store(
            (self.epoch.elapsed() + timeout).as_millis() as u64,
            Ordering::Relaxed,
        );
    }
    fn disarm(&self) {
        self.deadline_ms.store(0, Ordering::Relaxed);
    }
}

pub struct NcclCollectives {
    comm: nccl::ncclComm_t,
    group: String,
    rank: usize,
    world: usize,
    timeout: Duration,
    watchdog: Watchdog,
    device: usize,
}

// SAFETY: the communicator is used from one thread at a time (the trainer's).
unsafe impl Send for NcclCollectives {}

impl NcclCollectives {
    /// Create the communicator of `group` on CUDA device `device`: rank 0 makes
    /// the unique id and publishes it through the store.
    pub fn new(
        store: &mut StoreClient,
        group: &str,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclCollectives> {
        // SAFETY: plain CUDA runtime / NCCL calls with valid out-pointers.
        unsafe {
            cuda_check(cuda::cudaSetDevice(device as c_int), "cudaSetDevice")?;
            let key = format!("nccl/{group}/id");
            let mut id = nccl::ncclUniqueId { internal: [0; 128] };
            if rank == 0 {
                check(nccl::ncclGetUniqueId(&mut id), "ncclGetUniqueId")?;
                let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
                store.set(&key, &bytes)?;
            } else {
                store.wait(std::slice::from_ref(&key), timeout)?;
                let bytes = store.get(&key)?;
                for (d, s) in id.internal.iter_mut().zip(bytes) {
                    *d = s as _;
                }
            }
            let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
            let watchdog = Watchdog::start();
            watchdog.arm(
                format!("NCCL communicator `{group}` init (rank {rank} of {world})"),
                timeout,
            );
            check(
                nccl::ncclCommInitRank(&mut comm, world as c_int, id, rank as c_int),
                "ncclCommInitRank",
            )?;
            watchdog.disarm();
            Ok(NcclCollectives {
                comm,
                group: group.into(),
                rank,
                world,
                timeout,
                watchdog,
                device,
            })
        }
    }

    /// Run `f` (which enqueues NCCL work), then wait for the device, under the watchdog.
    fn run(&self, op: &str, f: impl FnOnce() -> nccl::ncclResult_t) -> Result<()> {
        self.watchdog.arm(
            format!(
                "collective {op} in group `{}` (rank {} of {})",
                self.group, self.rank, self.world
            ),
            self.timeout,
        );
        check(f(), op)?;
        // SAFETY: synchronising the current device has no preconditions.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, op)?;
        self.watchdog.disarm();
        Ok(())
    }

    /// Benchmark baseline: `iters` in-place all-reduces issued straight to NCCL
    /// on `t`, one device synchronisation at the end; returns seconds per call.
    pub fn plain_all_reduce_seconds(&self, t: &mut Tensor, iters: usize) -> Result<f64> {
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        let t0 = Instant::now();
        for _ in 0..iters {
            // SAFETY: in-place all-reduce on a live contiguous device buffer of n elements.
            check(
                unsafe {
                    nccl::ncclAllReduce(
                        p as *const c_void,
                        p,
                        n,
                        dt,
                        nccl::ncclRedOp_t::ncclSum,
                        self.comm,
                        Self::stream(),
                    )
                },
                "all_reduce",
            )?;
        }
        // SAFETY: synchronising the current device has no preconditions.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, "sync")?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    fn stream() -> nccl::cudaStream_t {
        std::ptr::null_mut()
    }
}

fn contiguous_cuda(t: &Tensor, op: &str) -> Result<()> {
    if !t.device().is_cuda() || !t.is_contiguous() {
        return Err(TrainError::Other(format!(
            "NCCL {op}: tensors must be contiguous and on a CUDA device"
        )));
    }
    Ok(())
}

impl Collectives for NcclCollectives {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        contiguous_cuda(t, "all_reduce")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: in-place all-reduce on a live contiguous device buffer of n elements.
        self.run("all_reduce", || unsafe {
            nccl::ncclAllReduce(
                p as *const c_void,
                p,
                n,
                dt,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        contiguous_cuda(t, "broadcast")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: in-place broadcast on a live contiguous device buffer.
        self.run("broadcast", || unsafe {
            nccl::ncclBroadcast(
                p as *const c_void,
                p,
                n,
                dt,
                root as c_int,
                self.comm,
                Self::stream(),
            )
        })
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Vec<Tensor>> {
        contiguous_cuda(t, "all_gather")?;
        let out = Tensor::empty(
            [self.world as i64 * t.numel() as i64],
            (t.kind(), t.device()),
        );
        let (s, r, n, dt) = (t.data_ptr(), out.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: out holds world * n elements; both buffers live until the sync in run().
        self.run("all_gather", || unsafe {
            nccl::ncclAllGather(s as *const c_void, r, n, dt, self.comm, Self::stream())
        })?;
        Ok(out
            .chunk(self.world as i64, 0)
            .into_iter()
            .map(|c| c.view(t.size().as_slice()))
            .collect())
    }

    fn reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        contiguous_cuda(t, "reduce_scatter")?;
        let n = t.numel();
        if n % self.world != 0 {
            return Err(TrainError::Other(format!(
                "reduce_scatter: {n} elements do not split over {} ranks",
                self.world
            )));
        }
        let out = Tensor::empty([(n / self.world) as i64], (t.kind(), t.device()));
        let (s, r, dt) = (t.data_ptr(), out.data_ptr(), dtype(t.kind())?);
        // SAFETY: out holds n / world elements; both buffers live until the sync in run().
        self.run("reduce_scatter", || unsafe {
            nccl::ncclReduceScatter(
                s as *const c_void,
                r,
                n / self.world,
                dt,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
        })?;
        Ok(out)
    }

    fn send(&mut self, t: &Tensor, to: usize) -> Result<()> {
        contiguous_cuda(t, "send")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: reads a live contiguous device buffer of n elements.
        self.run("send", || unsafe {
            nccl::ncclSend(
                p as *const c_void,
                n,
                dt,
                to as c_int,
                self.comm,
                Self::stream(),
            )
        })
    }

    fn recv(&mut self, t: &mut Tensor, from: usize) -> Result<()> {
        contiguous_cuda(t, "recv")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: writes a live contiguous device buffer of n elements.
        self.run("recv", || unsafe {
            nccl::ncclRecv(p, n, dt, from as c_int, self.comm, Self::stream())
        })
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, tch::Device::Cuda(self.device)));
        self.all_reduce_sum(&mut one)
    }
}

impl Drop for NcclCollectives {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is not used after this.
        unsafe {
            let _ = nccl::ncclCommDestroy(self.comm);
        }
    }
}
