//! libtorch failures become errors, never panics. tch's infallible tensor
//! methods panic when libtorch throws (out of memory, a device error, a shape
//! it rejects), with the C++ message and stack frames in the payload. Instead
//! of threading `f_*` calls through every operation, a command runs inside
//! [`catch`] (one level: the binary's `main`), and the panic hook installed by
//! [`install`] records the payload instead of printing it. `catch` turns it into
//! [`TrainError::Torch`]: what ran (phase, layer, device, from [`at`], which the
//! engine and the trainer keep up to date), libtorch's own message without the
//! C++ frames, and for out-of-memory a hint with the memory the configuration
//! needs by formula ([`set_memory_hint`]).
//!
//! A panic that is not a libtorch failure is a bug in sigma; it is reported as
//! an internal error with its location, still without the panic banner.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use crate::error::{clean_torch_message, TrainError};

/// What the current thread is doing, for error messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Where {
    pub phase: &'static str,
    pub layer: Option<usize>,
}

thread_local! {
    static WHERE: Cell<Where> = const { Cell::new(Where { phase: "", layer: None }) };
    static DEVICE: RefCell<String> = const { RefCell::new(String::new()) };
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

static MEMORY_HINT: Mutex<String> = Mutex::new(String::new());

struct Caught {
    message: String,
    location: String,
    at: Where,
    device: String,
}

/// Note what the current thread runs now (`layer`: the transformer block, if any).
pub fn at(phase: &'static str, layer: Option<usize>) {
    WHERE.with(|w| w.set(Where { phase, layer }));
}

/// The device the current thread computes on (e.g. "cuda:0", "cpu").
pub fn set_device(d: String) {
    DEVICE.with(|x| *x.borrow_mut() = d);
}

/// What an out-of-memory error should add: the memory this run needs by formula.
pub fn set_memory_hint(h: String) {
    *MEMORY_HINT.lock().unwrap_or_else(|e| e.into_inner()) = h;
}

fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Install the panic hook: inside [`catch`] a panic is recorded for it; on a
/// thread outside `catch` it is printed as one `error:` line.
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let message = payload_text(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let caught = Caught {
            message,
            location,
            at: WHERE.with(|w| w.get()),
            device: DEVICE.with(|d| d.borrow().clone()),
        };
        if DEPTH.with(|d| d.get()) > 0 {
            CAUGHT.with(|c| *c.borrow_mut() = Some(caught));
        } else {
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            eprintln!("error: {} (thread {thread})", to_error(caught));
        }
    }));
}

/// Run `f`; a panic inside it comes back as an error (see the module docs).
pub fn catch<T, E: From<TrainError>>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    match r {
        Ok(r) => r,
        Err(p) => {
            let caught = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or(Caught {
                message: payload_text(p.as_ref()),
                location: String::new(),
                at: Where::default(),
                device: String::new(),
            });
            Err(to_error(caught).into())
        }
    }
}

/// Undo the `{:?}` escaping of a string inside a debug-printed error.
fn is_torch(message: &str) -> bool {
    message.contains("Torch(") || message.contains("TchError") || message.contains("libtorch")
}

pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory")
}

fn to_error(c: Caught) -> TrainError {
    // Running out of memory is never a bug in sigma, whoever panicked with it.
    if !is_torch(&c.message) && !is_out_of_memory(&c.message) {
        return TrainError::Internal {
            message: c.message,
            location: c.location,
        };
    }
    let mut what = String::new();
    if !c.at.phase.is_empty() {
        what.push_str(c.at.phase);
    }
    if let Some(l) = c.at.layer {
        what.push_str(&format!(", layer {l}"));
    }
    if !c.device.is_empty() {
        what.push_str(&format!(" on {}", c.device));
    }
    let message = clean_torch_message(&c.message);
    let hint = if is_out_of_memory(&message) {
        let h = MEMORY_HINT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if h.is_empty() {
            "out of memory".to_string()
        } else {
            format!("out of memory. {h}")
        }
    } else {
        String::new()
    };
    TrainError::Torch {
        what: if what.is_empty() {
            "a libtorch operation".into()
        } else {
            what.trim().to_string()
        },
        message,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_tch_panic_payloads() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB.\\nException raised from malloc at alloc.cpp:12 (most recent call first):\\nframe #0: c10::Error::Error() + 0x1\")";
        assert_eq!(
            clean_torch_message(raw),
            "CUDA out of memory. Tried to allocate 2.00 GiB."
        );
        assert!(is_out_of_memory(
            "DefaultCPUAllocator: can't allocate memory: you tried"
        ));
    }

    /// A C++ shim's failure (`kernels::fused::shim_failed`, how every shim
    /// reports libtorch's exception) is a libtorch failure of the phase and
    /// layer, with the out-of-memory advice; so is any panic that says it ran
    /// out of memory. Neither is "internal error (a bug in sigma)", as an FP8
    /// linear and the fused weight gradient's GEMM were on an H100.
    #[test]
    fn a_shim_failure_and_out_of_memory_are_never_internal_errors() {
        install();
        let text = b"CUDA out of memory. Tried to allocate 384.00 MiB.";
        let mut err = [0 as std::ffi::c_char; 64];
        for (d, s) in err.iter_mut().zip(text) {
            *d = *s as std::ffi::c_char;
        }
        let r: Result<(), TrainError> = catch(|| {
            at("backward", Some(7));
            crate::kernels::fused::shim_failed("FP8 linear layer", &err)
        });
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("backward, layer 7")
                && e.contains(
                    "FP8 linear layer: CUDA out of memory. Tried to allocate 384.00 MiB."
                )
                && e.contains("out of memory."),
            "{e}"
        );
        assert!(!e.contains("internal error"), "{e}");
        let r: Result<(), TrainError> =
            catch(|| panic!("a step: CUDA out of memory. Tried to allocate 1.00 GiB"));
        let e = r.unwrap_err().to_string();
        assert!(
            !e.contains("internal error") && e.contains("out of memory"),
            "{e}"
        );
    }

    #[test]
    fn a_libtorch_failure_inside_catch_is_an_error_with_phase_layer_and_device() {
        install();
        set_device("cpu".into());
        set_memory_hint("This run needs about 1 GB. ".into());
        let r: Result<(), TrainError> = catch(|| {
            at("forward", Some(3));
            // Mismatched shapes: libtorch throws, tch's infallible wrapper panics.
            let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
            let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
            let _ = a.matmul(&b);
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("forward, layer 3 on cpu"), "{e}");
        assert!(!e.contains("frame #") && !e.contains("panicked"), "{e}");
        let r: Result<(), TrainError> = catch(|| panic!("plain bug"));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("internal error") && e.contains("plain bug"),
            "{e}"
        );
    }
}
