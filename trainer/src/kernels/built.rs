//! Kernels built once per key, for the whole process: each of the
//! run-time compiled kernel sets (decode attention per shape, rows and head
//! groups; the matrix-vector kernels per row bucket and variant; the
//! training kernels per device) keeps its built modules in one [`Built`].
//! A key is built by the first thread that asks for it, with no lock held
//! over other keys, and every other thread asking for the same key waits
//! for that build instead of compiling it again; many keys build in
//! parallel ([`Built::build_all`]). A result, failure included, is kept
//! for good; a build that panics is a failure carrying the panic's message;
//! every failure is reported once, by the set's own `report`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

/// What building one key gave: its kernels, or why there are none.
pub type Outcome<V> = Result<Arc<V>, String>;

/// One cell per key, made under the map's lock and filled outside it.
type Cells<K, V> = Mutex<HashMap<K, Arc<OnceLock<Outcome<V>>>>>;

/// The kernels of every key built so far (a `static` of each kernel set).
pub struct Built<K, V> {
    cells: OnceLock<Cells<K, V>>,
    /// Told of each key whose build failed, once (a warning naming what
    /// is not used and what runs instead).
    report: fn(&K, &str),
}

impl<K, V> Built<K, V>
where
    K: Clone + Eq + Hash + Send + Sync,
    V: Send + Sync,
{
    pub const fn new(report: fn(&K, &str)) -> Self {
        Built {
            cells: OnceLock::new(),
            report,
        }
    }

    fn cell(&self, key: &K) -> Arc<OnceLock<Outcome<V>>> {
        let mut cells = self
            .cells
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cells.entry(key.clone()).or_default().clone()
    }

    /// The kernels of `key`: built by `build` where no thread built them
    /// yet; where another thread is building them, its result once done.
    /// `build` must not use rayon nor ask for `key` itself: a thread
    /// waiting in rayon could take up a job that asks for the key it is
    /// building, and a build that asks for its own key never ends.
    pub fn get(&self, key: &K, build: impl FnOnce() -> Outcome<V>) -> Outcome<V> {
        self.cell(key)
            .get_or_init(|| {
                let r = guarded(build);
                if let Err(e) = &r {
                    (self.report)(key, e);
                }
                r
            })
            .clone()
    }

    /// The kernels of `key` if they are built (no waiting, nothing built).
    #[cfg(test)]
    pub fn ready(&self, key: &K) -> Option<Outcome<V>> {
        let cells = self.cells.get()?.lock().unwrap_or_else(|e| e.into_inner());
        cells.get(key).and_then(|c| c.get().cloned())
    }

    /// Build every key of `keys` not built yet, in parallel on rayon's
    /// threads (a key being built elsewhere is waited for); results as
    /// [`Built::get`]'s, in the keys' order.
    pub fn build_all(
        &self,
        keys: &[K],
        build: impl Fn(&K) -> Outcome<V> + Sync,
    ) -> Vec<Outcome<V>> {
        use rayon::prelude::*;
        if keys.len() <= 1 {
            return keys.iter().map(|k| self.get(k, || build(k))).collect();
        }
        keys.par_iter().map(|k| self.get(k, || build(k))).collect()
    }
}

/// `build()`, a panic in it turned into an error carrying its message.
fn guarded<V>(build: impl FnOnce() -> Outcome<V>) -> Outcome<V> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("its build panicked: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    /// Results come back in the keys' order, each key is built once however
    /// often and from however many threads it is asked for, and a build
    /// that panics is an error of its own carrying the message.
    #[test]
    fn each_key_is_built_once_and_results_keep_the_keys_order() {
        static FAILED: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
        static B: Built<u32, u32> = Built::new(|&k, e| FAILED.lock().unwrap().push((k, e.into())));
        let calls = AtomicUsize::new(0);
        let build = |&k: &u32| -> Outcome<u32> {
            calls.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            match k {
                3 => Err("three does not build".into()),
                4 => panic!("four panicked"),
                k => Ok(Arc::new(k * 10)),
            }
        };
        let keys: Vec<u32> = vec![5, 1, 3, 4, 2, 1, 5];
        let got = B.build_all(&keys, build);
        let text: Vec<String> = got
            .iter()
            .map(|r| match r {
                Ok(v) => v.to_string(),
                Err(e) => e.clone(),
            })
            .collect();
        assert_eq!(
            text,
            [
                "50",
                "10",
                "three does not build",
                "its build panicked: four panicked",
                "20",
                "10",
                "50"
            ]
        );
        assert_eq!(calls.load(SeqCst), 5, "one build per distinct key");
        // Asked again, from several threads at once: nothing is built again.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| B.build_all(&keys, build));
            }
        });
        assert_eq!(
            B.get(&2, || unreachable!("built already")).ok().as_deref(),
            Some(&20)
        );
        assert_eq!(calls.load(SeqCst), 5);
        assert_eq!(B.ready(&9), None);
        // Each failure was reported once.
        let mut failed = FAILED.lock().unwrap().clone();
        failed.sort();
        assert_eq!(
            failed,
            [
                (3, "three does not build".to_string()),
                (4, "its build panicked: four panicked".to_string())
            ]
        );
    }

    /// A thread asking for a key that another thread is building waits for
    /// that build and gets its result, without building it again; other
    /// keys are not held up meanwhile.
    #[test]
    fn a_key_being_built_is_waited_for_not_built_again() {
        static B: Built<&'static str, String> = Built::new(|_, e| panic!("no failure here: {e}"));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let slow = s.spawn(move || {
                B.get(&"slow", || {
                    started_tx.send(()).unwrap();
                    finish_rx.recv().unwrap();
                    Ok(Arc::new("built by the first".to_string()))
                })
            });
            started_rx.recv().unwrap();
            assert_eq!(B.ready(&"slow"), None, "not built yet");
            // Another key builds while "slow" is in progress.
            let other = B.get(&"other", || Ok(Arc::new("other".into())));
            assert_eq!(other.unwrap().as_str(), "other");
            let waiter = s.spawn(|| B.get(&"slow", || Ok(Arc::new("built again".into()))));
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !waiter.is_finished(),
                "the second asker waits for the build"
            );
            finish_tx.send(()).unwrap();
            assert_eq!(slow.join().unwrap().unwrap().as_str(), "built by the first");
            assert_eq!(
                waiter.join().unwrap().unwrap().as_str(),
                "built by the first"
            );
        });
    }
}
