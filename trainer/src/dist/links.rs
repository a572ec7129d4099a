//! The channels of a pipeline's virtual edges: for every edge (stage `s` to
//! `s + 1`) this rank is on, a two-rank group for activations and one for
//! gradients, each carrying messages one way only.

use std::collections::BTreeMap;

use crate::dist::Collectives;
use crate::error::Result;

/// The two-rank channels of the virtual edges this rank is on. Ordered maps:
/// they are dropped (their communicators destroyed) in ascending edge order,
/// activations first, the same order on every rank. A hash map's order is
/// random per process, and with interleaving two ranks share several
/// channels and the edges form a ring (the last rank feeds the first), so
/// teardown orders could differ between neighbours.
#[derive(Default)]
pub struct Links {
    /// Activations of edge `s -> s + 1` (sender is rank 0 of the group).
    pub act: BTreeMap<usize, Box<dyn Collectives>>,
    /// Gradients of edge `s -> s + 1`, flowing back (stage `s + 1` is rank 0).
    pub grad: BTreeMap<usize, Box<dyn Collectives>>,
}

impl Links {
    pub fn chan(
        map: &mut BTreeMap<usize, Box<dyn Collectives>>,
        edge: usize,
    ) -> &mut dyn Collectives {
        match map.get_mut(&edge) {
            Some(c) => c.as_mut(),
            None => panic!("no pipeline channel for edge {edge} on this rank"),
        }
    }

    /// Order later work after every send started (the end of a step).
    pub fn finish(&mut self) -> Result<()> {
        for c in self.act.values_mut().chain(self.grad.values_mut()) {
            c.wait_pending()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use tch::Tensor;

    /// A channel that only records when it is torn down.
    struct Recorder(&'static str, usize, Arc<Mutex<Vec<(&'static str, usize)>>>);

    impl Drop for Recorder {
        fn drop(&mut self) {
            self.2.lock().unwrap().push((self.0, self.1));
        }
    }

    impl Collectives for Recorder {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, _: &mut Tensor) -> Result<()> {
            unreachable!()
        }
        fn broadcast(&mut self, _: &mut Tensor, _: usize) -> Result<()> {
            unreachable!()
        }
        fn all_gather(&mut self, _: &Tensor) -> Result<Vec<Tensor>> {
            unreachable!()
        }
        fn reduce_scatter_sum(&mut self, _: &Tensor) -> Result<Tensor> {
            unreachable!()
        }
        fn send(&mut self, _: &Tensor, _: usize) -> Result<()> {
            unreachable!()
        }
        fn recv(&mut self, _: &mut Tensor, _: usize) -> Result<()> {
            unreachable!()
        }
        fn barrier(&mut self) -> Result<()> {
            unreachable!()
        }
    }

    /// Every rank tears its channels down in one global order (activations by
    /// ascending edge, then gradients), whatever order they were made in, so
    /// neighbours sharing several channels never wait on each other in a cycle.
    #[test]
    fn channels_are_torn_down_in_ascending_edge_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let edges = [9, 2, 14, 0, 7, 11, 3, 5, 12, 1];
        {
            let mut links = Links::default();
            for &e in &edges {
                links
                    .grad
                    .insert(e, Box::new(Recorder("grad", e, log.clone())));
                links
                    .act
                    .insert(e, Box::new(Recorder("act", e, log.clone())));
            }
        }
        let mut sorted = edges.to_vec();
        sorted.sort();
        let want: Vec<_> = sorted
            .iter()
            .map(|&e| ("act", e))
            .chain(sorted.iter().map(|&e| ("grad", e)))
            .collect();
        assert_eq!(*log.lock().unwrap(), want);
    }
}
