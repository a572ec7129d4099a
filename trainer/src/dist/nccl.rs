//! The NCCL backend of `Collectives`, for tensors on GPUs: NCCL (loaded at run
//! time through cudarc; the very libnccl that libtorch loaded, see
//! `loaded_cuda_libs`) called on the tensors' own device pointers.
//!
//! Streams: collectives run on a communication stream of their own (of the
//! highest priority, so they get SMs while backward kernels queue). Before
//! each one an event recorded on the compute stream (libtorch's default
//! stream) is waited for on the communication stream, so it reads finished
//! gradients; after it, the compute stream waits for the communication stream
//! the same way (at once for the blocking calls, at `wait_pending` for the
//! started ones, `start_all_reduce_sum`, `start_all_gather_flat` and
//! `start_reduce_scatter_sum`, whose buffers are held until then). No call blocks
//! the host, so collectives overlap compute that does not depend on them.
//!
//! A collective that hangs (a dead peer, a mismatched call) must not hang the
//! job: a watchdog thread polls the completion event of every collective in
//! flight; past the timeout it prints the group, operation and rank and ends
//! the process with code 1 (see `die`).
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
        k => {
            return Err(TrainError::gpu(
                "NCCL",
                "dtype",
                format!("{k:?} is not supported"),
            ))
        }
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
    Err(TrainError::gpu("NCCL", what, format!("{msg} ({r:?})")))
}

fn cuda_check(r: cuda::cudaError_t, what: &str) -> Result<()> {
    if r == cuda::cudaError_t::cudaSuccess {
        Ok(())
    } else {
        Err(TrainError::gpu("CUDA", what, format!("{r:?}")))
    }
}

/// The NCCL and CUDA runtime libraries this process has loaded (libtorch's
/// own), as (the name cudarc loads, the loaded file). cudarc looks for
/// `libnccl.so` and `libcudart.so`, never libtorch's `libnccl.so.2`, and a
/// different NCCL than libtorch's breaks communicators; `sigma` therefore
/// links these names to these files and restarts itself with the links first
/// on its library path (launch/src/cuda_libs.rs).
pub fn loaded_cuda_libs() -> Vec<(&'static str, std::path::PathBuf)> {
    [
        ("libnccl.so.", "libnccl.so"),
        ("libcudart.so.", "libcudart.so"),
    ]
    .iter()
    .filter_map(|(needle, name)| {
        crate::kernels::cuda_libs::loaded_library(needle).map(|p| (*name, p))
    })
    .collect()
}

/// A collective enqueued on the communication stream and not yet seen complete.
struct InFlight {
    /// `cudaEvent_t` recorded after the collective, as an address (events are plain handles).
    event: usize,
    deadline: Instant,
    what: String,
}

/// Watches every collective of a communicator from a thread of its own: polls
/// the completion events of those in flight and exits the process, naming the
/// operation, when one is not done by its deadline. Enqueueing is watched too
/// (NCCL may block the host while it connects to a peer that is gone).
struct Watchdog {
    /// Deadline (ms since `epoch`) of an enqueue in progress; 0 when none.
    enqueue_deadline_ms: Arc<AtomicU64>,
    enqueue_what: Arc<Mutex<String>>,
    in_flight: Arc<Mutex<Vec<InFlight>>>,
    epoch: Instant,
}

/// A collective that will never finish leaves the main thread blocked in a
/// device sync, so the process ends here, without running exit handlers
/// (they would tear libtorch down under the main thread).
fn die(what: &str) -> ! {
    let reason = super::abort::reason()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    super::abort::exit_now(&format!(
        "{what} did not complete in time: a peer is lost or called a different collective{reason}; exiting"
    ))
}

impl Watchdog {
    fn start(device: usize) -> Watchdog {
        let enqueue_deadline_ms = Arc::new(AtomicU64::new(0));
        let enqueue_what = Arc::new(Mutex::new(String::new()));
        let in_flight: Arc<Mutex<Vec<InFlight>>> = Arc::new(Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let (d, w, f) = (
            enqueue_deadline_ms.clone(),
            enqueue_what.clone(),
            in_flight.clone(),
        );
        std::thread::Builder::new()
            .name("sigma-nccl-watchdog".into())
            .spawn(move || {
                // SAFETY: selecting the device this thread queries events of.
                let _ = unsafe { cuda::cudaSetDevice(device as c_int) };
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    let dl = d.load(Ordering::Relaxed);
                    if dl != 0 && epoch.elapsed().as_millis() as u64 > dl {
                        die(&w.lock().map(|s| s.clone()).unwrap_or_default());
                    }
                    let mut list = f.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    let mut i = 0;
                    while i < list.len() {
                        let ev = list[i].event as cuda::cudaEvent_t;
                        // SAFETY: the event was created by this communicator and is destroyed only here.
                        match unsafe { cuda::cudaEventQuery(ev) } {
                            cuda::cudaError_t::cudaErrorNotReady if now > list[i].deadline => {
                                die(&list[i].what)
                            }
                            cuda::cudaError_t::cudaErrorNotReady => i += 1,
                            _ => {
                                // SAFETY: complete (or failed); no stream refers to it any more.
                                let _ = unsafe { cuda::cudaEventDestroy(ev) };
                                list.swap_remove(i);
                            }
                        }
                    }
                }
            })
            .expect("watchdog thread");
        Watchdog {
            enqueue_deadline_ms,
            enqueue_what,
            in_flight,
            epoch,
        }
    }
    fn arm(&self, what: &str, timeout: Duration) {
        if let Ok(mut w) = self.enqueue_what.lock() {
            *w = what.to_string();
        }
        self.enqueue_deadline_ms.store(
            (self.epoch.elapsed() + timeout).as_millis() as u64,
            Ordering::Relaxed,
        );
    }
    fn disarm(&self) {
        self.enqueue_deadline_ms.store(0, Ordering::Relaxed);
    }
    fn watch(&self, event: cuda::cudaEvent_t, what: String, timeout: Duration) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(InFlight {
                event: event as usize,
                deadline: Instant::now() + timeout,
                what,
            });
    }
}

/// The compute stream: the one libtorch issues kernels to (the legacy default stream).
fn compute_stream() -> cuda::cudaStream_t {
    std::ptr::null_mut()
}

/// Wait for the work issued so far on the compute stream only: unlike a
/// device-wide synchronisation it does not wait for sends still queued on
/// communication streams, which may complete only when a peer gets further
/// (pipeline traces time their actions with it).
pub fn sync_compute_stream() -> Result<()> {
    // SAFETY: synchronising the (legacy default) compute stream has no preconditions.
    cuda_check(
        unsafe { cuda::cudaStreamSynchronize(compute_stream()) },
        "cudaStreamSynchronize",
    )
}

fn new_event() -> Result<cuda::cudaEvent_t> {
    let mut ev: cuda::cudaEvent_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    cuda_check(
        unsafe { cuda::cudaEventCreateWithFlags(&mut ev, cuda::cudaEventDisableTiming) },
        "cudaEventCreate",
    )?;
    Ok(ev)
}

/// Make `waiter` wait (on the device, the host does not block) for everything
/// enqueued on `on` so far. The event is destroyed once the wait is enqueued
/// (CUDA keeps it alive until the wait is resolved).
fn stream_wait(waiter: cuda::cudaStream_t, on: cuda::cudaStream_t) -> Result<()> {
    let ev = new_event()?;
    // SAFETY: a fresh event recorded on a live stream and waited on by another.
    unsafe {
        cuda_check(cuda::cudaEventRecord(ev, on), "cudaEventRecord")?;
        cuda_check(
            cuda::cudaStreamWaitEvent(waiter, ev, 0),
            "cudaStreamWaitEvent",
        )?;
        let _ = cuda::cudaEventDestroy(ev);
    }
    Ok(())
}

pub struct NcclCollectives {
    comm: nccl::ncclComm_t,
    /// Collectives run here, ordered after the compute stream by an event
    /// recorded before each one; the compute stream waits for them the same way.
    stream: cuda::cudaStream_t,
    group: String,
    rank: usize,
    world: usize,
    timeout: Duration,
    watchdog: Watchdog,
    device: usize,
    /// Buffers of started collectives that the compute stream has not yet been
    /// made to wait for; kept alive (and so out of the caching allocator) until then.
    pending: Vec<Tensor>,
}

// SAFETY: the communicator and stream are used from one thread at a time (the trainer's).
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
            // Highest priority: the block scheduler hands freed SMs to the
            // collective before queued compute blocks, so it overlaps backward
            // instead of waiting for a gap.
            let (mut least, mut greatest) = (0, 0);
            cuda_check(
                cuda::cudaDeviceGetStreamPriorityRange(&mut least, &mut greatest),
                "cudaDeviceGetStreamPriorityRange",
            )?;
            let mut stream: cuda::cudaStream_t = std::ptr::null_mut();
            cuda_check(
                cuda::cudaStreamCreateWithPriority(
                    &mut stream,
                    cuda::cudaStreamNonBlocking,
                    greatest,
                ),
                "cudaStreamCreate",
            )?;
            let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
            let watchdog = Watchdog::start(device);
            watchdog.arm(
                &format!("NCCL communicator `{group}` init (rank {rank} of {world})"),
                timeout,
            );
            check(
                nccl::ncclCommInitRank(&mut comm, world as c_int, id, rank as c_int),
                "ncclCommInitRank",
            )?;
            watchdog.disarm();
            Ok(NcclCollectives {
                comm,
                stream,
                group: group.into(),
                rank,
                world,
                timeout,
                watchdog,
                device,
                pending: Vec::new(),
            })
        }
    }

    fn nccl_stream(&self) -> nccl::cudaStream_t {
        self.stream as nccl::cudaStream_t
    }

    /// Enqueue a collective (`f`) on the communication stream after the
    /// compute work issued so far, and hand its completion to the watchdog.
    /// The host never blocks on the device here.
    fn enqueue(&self, op: &str, f: impl FnOnce() -> nccl::ncclResult_t) -> Result<()> {
        let what = format!(
            "collective {op} in group `{}` (rank {} of {})",
            self.group, self.rank, self.world
        );
        stream_wait(self.stream, compute_stream())?;
        self.watchdog.arm(&what, self.timeout);
        let r = check(f(), op);
        self.watchdog.disarm();
        r?;
        let done = new_event()?;
        // SAFETY: a fresh event recorded on the live communication stream.
        cuda_check(
            unsafe { cuda::cudaEventRecord(done, self.stream) },
            "cudaEventRecord",
        )?;
        self.watchdog.watch(done, what, self.timeout);
        Ok(())
    }

    /// Enqueue a collective and order the compute stream after it (no host wait).
    fn run(&self, op: &str, f: impl FnOnce() -> nccl::ncclResult_t) -> Result<()> {
        self.enqueue(op, f)?;
        stream_wait(compute_stream(), self.stream)
    }

    /// Benchmark baseline: `iters` in-place all-reduces issued straight to NCCL
    /// on `t` (on the compute stream, no events), one device synchronisation
    /// at the end; returns seconds per call.
    pub fn plain_all_reduce_seconds(&self, t: &mut Tensor, iters: usize) -> Result<f64> {
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: synchronising the current device has no preconditions.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, "sync")?;
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
                        compute_stream() as nccl::cudaStream_t,
                    )
                },
                "all_reduce",
            )?;
        }
        // SAFETY: synchronising the current device has no preconditions.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, "sync")?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    /// The same `iters` all-reduces through sigma's collective layer (events,
    /// communication stream, watchdog), one device synchronisation at the end.
    pub fn sigma_all_reduce_seconds(&mut self, t: &mut Tensor, iters: usize) -> Result<f64> {
        // SAFETY: synchronising the current device has no preconditions.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, "sync")?;
        let t0 = Instant::now();
        for _ in 0..iters {
            self.all_reduce_sum(t)?;
        }
        // SAFETY: as above.
        cuda_check(unsafe { cuda::cudaDeviceSynchronize() }, "sync")?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }
}

fn contiguous_cuda(t: &Tensor, op: &str) -> Result<()> {
    if !t.device().is_cuda() || !t.is_contiguous() {
        return Err(TrainError::gpu(
            "NCCL",
            op,
            "tensors must be contiguous and on a CUDA device",
        ));
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
        self.start_all_reduce_sum(t)?;
        self.wait_pending()
    }

    fn start_all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        contiguous_cuda(t, "all_reduce")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: in-place all-reduce on a live contiguous device buffer of n
        // elements, kept alive in `pending` until the compute stream waits for it.
        self.enqueue("all_reduce", || unsafe {
            nccl::ncclAllReduce(
                p as *const c_void,
                p,
                n,
                dt,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                self.nccl_stream(),
            )
        })?;
        self.pending.push(t.shallow_clone());
        Ok(())
    }

    fn wait_pending(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            stream_wait(compute_stream(), self.stream)?;
            self.pending.clear();
        }
        Ok(())
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
                self.nccl_stream(),
            )
        })
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Vec<Tensor>> {
        let out = self.start_all_gather_flat(t)?;
        self.wait_pending()?;
        Ok(out
            .chunk(self.world as i64, 0)
            .into_iter()
            .map(|c| c.view(t.size().as_slice()))
            .collect())
    }

    fn start_all_gather_flat(&mut self, t: &Tensor) -> Result<Tensor> {
        contiguous_cuda(t, "all_gather")?;
        let out = Tensor::empty(
            [self.world as i64 * t.numel() as i64],
            (t.kind(), t.device()),
        );
        let (s, r, n, dt) = (t.data_ptr(), out.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: out holds world * n elements; both are kept in `pending`
        // until the compute stream waits for the collective.
        self.enqueue("all_gather", || unsafe {
            nccl::ncclAllGather(s as *const c_void, r, n, dt, self.comm, self.nccl_stream())
        })?;
        self.pending.push(t.shallow_clone());
        self.pending.push(out.shallow_clone());
        Ok(out)
    }

    fn reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let part = self.start_reduce_scatter_sum(t)?;
        self.wait_pending()?;
        Ok(part)
    }

    fn start_reduce_scatter_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        contiguous_cuda(t, "reduce_scatter")?;
        let n = t.numel();
        if !n.is_multiple_of(self.world) {
            return Err(TrainError::gpu(
                "NCCL",
                "reduce_scatter",
                format!("{n} elements do not split over {} ranks", self.world),
            ));
        }
        let out = Tensor::empty([(n / self.world) as i64], (t.kind(), t.device()));
        let (s, r, dt) = (t.data_ptr(), out.data_ptr(), dtype(t.kind())?);
        // SAFETY: out holds n / world elements; both are kept in `pending`
        // until the compute stream waits for the collective.
        self.enqueue("reduce_scatter", || unsafe {
            nccl::ncclReduceScatter(
                s as *const c_void,
                r,
                n / self.world,
                dt,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                self.nccl_stream(),
            )
        })?;
        self.pending.push(t.shallow_clone());
        self.pending.push(out.shallow_clone());
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
                self.nccl_stream(),
            )
        })
    }

    fn start_send(&mut self, t: &Tensor, to: usize) -> Result<()> {
        contiguous_cuda(t, "send")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: reads a live contiguous device buffer of n elements, kept
        // alive in `pending` until the compute stream is made to wait for it.
        self.enqueue("send", || unsafe {
            nccl::ncclSend(
                p as *const c_void,
                n,
                dt,
                to as c_int,
                self.comm,
                self.nccl_stream(),
            )
        })?;
        self.pending.push(t.shallow_clone());
        Ok(())
    }

    fn recv(&mut self, t: &mut Tensor, from: usize) -> Result<()> {
        contiguous_cuda(t, "recv")?;
        let (p, n, dt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        // SAFETY: writes a live contiguous device buffer of n elements.
        self.run("recv", || unsafe {
            nccl::ncclRecv(p, n, dt, from as c_int, self.comm, self.nccl_stream())
        })
    }

    fn send_recv(&mut self, t: &Tensor, to: usize, into: &mut Tensor, from: usize) -> Result<()> {
        self.start_send_recv(t, to, into, from)?;
        self.wait_pending()
    }

    /// One grouped call (send and receive together), so a ring of ranks
    /// that all send first cannot deadlock, on the communication stream
    /// after the compute work issued so far; the compute stream is not made
    /// to wait (both buffers are kept until `wait_pending`).
    fn start_send_recv(
        &mut self,
        t: &Tensor,
        to: usize,
        into: &mut Tensor,
        from: usize,
    ) -> Result<()> {
        contiguous_cuda(t, "send_recv")?;
        contiguous_cuda(into, "send_recv")?;
        let (sp, sn, sdt) = (t.data_ptr(), t.numel(), dtype(t.kind())?);
        let (rp, rn, rdt) = (into.data_ptr(), into.numel(), dtype(into.kind())?);
        let ok = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: reads a live contiguous device buffer of sn elements and
        // writes one of rn elements, both kept alive in `pending` until the
        // compute stream is made to wait, inside one NCCL group.
        self.enqueue("send_recv", || unsafe {
            let r = nccl::ncclGroupStart();
            if r != ok {
                return r;
            }
            let (comm, stream) = (self.comm, self.nccl_stream());
            let s = nccl::ncclSend(sp as *const c_void, sn, sdt, to as c_int, comm, stream);
            let r = nccl::ncclRecv(rp, rn, rdt, from as c_int, comm, stream);
            let e = nccl::ncclGroupEnd();
            [s, r, e].into_iter().find(|x| *x != ok).unwrap_or(ok)
        })?;
        self.pending.push(t.shallow_clone());
        self.pending.push(into.shallow_clone());
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, tch::Device::Cuda(self.device)));
        self.all_reduce_sum(&mut one)
    }
}

/// How long a communicator's teardown waits for its stream to drain. At a
/// clean end every rank has passed the job's final barrier first, so every
/// receive its peers will ever post is posted: work still queued after this
/// is stuck (and after a failure, waiting longer helps nobody).
const TEARDOWN_GRACE: Duration = Duration::from_secs(30);

impl Drop for NcclCollectives {
    /// Tear down without ever waiting on a peer for long: the communication
    /// stream is given `TEARDOWN_GRACE` (or the job's timeout, if shorter) to
    /// drain (a send whose receiver never came would block a plain
    /// synchronisation for ever); a drained communicator is destroyed, one
    /// that is not (or whose stream reports an error) is aborted, which frees
    /// it locally, and the rank says which group and why. The watchdog may
    /// end the process first, naming the operation, if that operation's own
    /// deadline passes during the wait; `Job`'s drop bounds the whole teardown.
    fn drop(&mut self) {
        let grace = self.timeout.min(TEARDOWN_GRACE);
        let deadline = Instant::now() + grace;
        // SAFETY: the communicator and stream were created in new() and are not used after this.
        unsafe {
            let state = loop {
                match cuda::cudaStreamQuery(self.stream) {
                    cuda::cudaError_t::cudaErrorNotReady if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    r => break r,
                }
            };
            if state == cuda::cudaError_t::cudaSuccess {
                let _ = nccl::ncclCommDestroy(self.comm);
            } else {
                let why = match state {
                    cuda::cudaError_t::cudaErrorNotReady => {
                        format!(
                            "communication still in flight {} s after the end",
                            grace.as_secs()
                        )
                    }
                    e => format!("its stream reports {e:?}"),
                };
                eprintln!(
                    "sigma: rank {} of group {}: {why}; aborting the communicator",
                    self.rank, self.group
                );
                let _ = nccl::ncclCommAbort(self.comm);
            }
            let _ = cuda::cudaStreamDestroy(self.stream);
        }
    }
}
