//! Collectives between the ranks of one tensor-parallel model when the ranks are threads of
//! this process and their buffers are host memory (the CPU path, and the reference the GPU
//! path's NCCL collectives are tested against).
//!
//! A [`LocalGroup`] is shared by its ranks; every collective is entered by all of them, in the
//! same order, with buffers of the same length (the caller's invariant: ranks run the same
//! steps). Each collective publishes every rank's buffer, waits at a barrier, reads, and waits
//! again before any slot can be overwritten, so no rank runs ahead into the next collective's
//! slots. Sums are taken in rank order, so every rank gets the same bits.
//!
//! A rank that fails (its step returns an error or panics) aborts the group
//! ([`LocalGroup::abort`], also done by [`AbortOnFailure`] when dropped during a panic): every
//! rank waiting in a collective, and every later collective, then returns [`Aborted`] instead of
//! waiting forever, so a failed rank fails the model's step, never hangs it. Once every rank has
//! left the step, [`LocalGroup::reset`] makes the group usable again.

use std::ops::Range;
use std::sync::{Condvar, Mutex};

/// The group was aborted: a rank failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted;

/// A barrier for `ranks` threads that can be aborted.
struct Gate {
    ranks: usize,
    /// (threads arrived in this generation, generation, aborted)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, (usize, u64, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) -> Result<(), Aborted> {
        let mut st = self.state();
        if st.2 {
            return Err(Aborted);
        }
        st.0 += 1;
        if st.0 == self.ranks {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.1;
        while st.1 == generation && !st.2 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.1 == generation { Err(Aborted) } else { Ok(()) }
    }

    fn abort(&self) {
        self.state().2 = true;
        self.cv.notify_all();
    }

    fn aborted(&self) -> bool {
        self.state().2
    }

    /// No thread waits: forgets arrivals and the abort (a new generation).
    fn reset(&self) {
        let mut st = self.state();
        *st = (0, st.1 + 1, false);
    }
}

/// The shared state of `ranks` threads' collectives.
pub struct LocalGroup {
    gate: Gate,
    slots: Vec<Mutex<Vec<f32>>>,
}

impl LocalGroup {
    pub fn new(ranks: usize) -> LocalGroup {
        LocalGroup {
            gate: Gate { ranks, state: Mutex::new((0, 0, false)), cv: Condvar::new() },
            slots: (0..ranks).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// How many ranks meet in the group.
    pub fn ranks(&self) -> usize {
        self.gate.ranks
    }

    /// Fails every collective, now waiting or later (a rank failed).
    pub fn abort(&self) {
        self.gate.abort();
    }

    pub fn aborted(&self) -> bool {
        self.gate.aborted()
    }

    /// Clears an abort. Only when no rank is inside a collective (every rank's step has
    /// returned): the group then starts afresh.
    pub fn reset(&self) {
        self.gate.reset();
    }

    fn slot(&self, rank: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.slots[rank].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, rank: usize, data: &[f32]) {
        let mut slot = self.slot(rank);
        slot.clear();
        slot.extend_from_slice(data);
    }

    /// `buf` becomes the element-wise sum of every rank's `buf` (added in rank order).
    pub fn all_reduce_sum(&self, rank: usize, buf: &mut [f32]) -> Result<(), Aborted> {
        if self.gate.ranks == 1 {
            return Ok(());
        }
        self.publish(rank, buf);
        self.gate.wait()?;
        for r in 0..self.gate.ranks {
            let slot = self.slot(r);
            if r == 0 {
                buf.copy_from_slice(&slot);
            } else {
                buf.iter_mut().zip(slot.iter()).for_each(|(b, s)| *b += s);
            }
        }
        self.gate.wait()
    }

    /// Every rank's `part` (`rows` rows of that rank's width) placed side by side: `out` gets
    /// `rows` rows of the summed widths, rank `r`'s part in columns `columns(r)`. `columns`
    /// must tile `0..width` in rank order.
    pub fn all_gather_columns(
        &self,
        rank: usize,
        part: &[f32],
        rows: usize,
        columns: impl Fn(usize) -> Range<usize>,
        out: &mut [f32],
    ) -> Result<(), Aborted> {
        let width = out.len().checked_div(rows).unwrap_or(0);
        let place = |r: usize, src: &[f32], out: &mut [f32]| {
            let cols = columns(r);
            for row in 0..rows {
                let from = &src[row * cols.len()..(row + 1) * cols.len()];
                out[row * width + cols.start..row * width + cols.end].copy_from_slice(from);
            }
        };
        if self.gate.ranks == 1 {
            place(0, part, out);
            return Ok(());
        }
        self.publish(rank, part);
        self.gate.wait()?;
        for r in 0..self.gate.ranks {
            place(r, &self.slot(r), out);
        }
        self.gate.wait()
    }
}

/// Aborts `group` when dropped while its thread panics (hold one for a rank's step).
pub struct AbortOnFailure<'a>(pub &'a LocalGroup);

impl Drop for AbortOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn all_reduce_gives_every_rank_the_same_sum() {
        let group = Arc::new(LocalGroup::new(3));
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = group.clone();
                    s.spawn(move || {
                        let mut out = Vec::new();
                        // Two collectives back to back: the second must not see the first's slots.
                        for round in 0..2 {
                            let mut buf: Vec<f32> = (0..5).map(|i| (rank * 10 + i + round * 100) as f32).collect();
                            group.all_reduce_sum(rank, &mut buf).unwrap();
                            out.extend(buf);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f32> = (0..2)
            .flat_map(|round| (0..5).map(move |i| (0..3).map(|r| (r * 10 + i + round * 100) as f32).sum::<f32>()))
            .collect();
        for r in &results {
            assert_eq!(r, &want);
        }
    }

    #[test]
    fn all_gather_places_each_ranks_columns() {
        let group = Arc::new(LocalGroup::new(2));
        // Rank 0 holds columns 0..3, rank 1 columns 3..5, of two rows.
        let columns = |r: usize| if r == 0 { 0..3 } else { 3..5 };
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let group = group.clone();
                    s.spawn(move || {
                        let cols = columns(rank);
                        let part: Vec<f32> =
                            (0..2).flat_map(|row| cols.clone().map(move |c| (row * 10 + c) as f32)).collect();
                        let mut out = vec![0.0; 10];
                        group.all_gather_columns(rank, &part, 2, columns, &mut out).unwrap();
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f32> = (0..2).flat_map(|row| (0..5).map(move |c| (row * 10 + c) as f32)).collect();
        assert_eq!(results[0], want);
        assert_eq!(results[1], want);
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let group = LocalGroup::new(3);
        let results: Vec<Result<(), Aborted>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = &group;
                    s.spawn(move || {
                        let _guard = AbortOnFailure(group);
                        if rank == 2 {
                            panic!("rank 2 fails before its collective");
                        }
                        let mut buf = vec![1.0; 4];
                        group.all_reduce_sum(rank, &mut buf)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        assert_eq!(results, vec![Err(Aborted), Err(Aborted)]);
        let mut buf = vec![0.0; 2];
        assert_eq!(group.all_reduce_sum(0, &mut buf), Err(Aborted), "an aborted group stays aborted");
        // Reset once every rank is out: the three ranks reduce together again.
        group.reset();
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = &group;
                    s.spawn(move || {
                        let mut buf = vec![rank as f32; 2];
                        group.all_reduce_sum(rank, &mut buf).unwrap();
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(sums.iter().all(|b| b == &vec![3.0, 3.0]), "{sums:?}");
    }
}
