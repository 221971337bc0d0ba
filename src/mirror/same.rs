//! Paths whose NARs are identical (the same bytes under two store paths, as identical build
//! outputs, or one file fetched under two names, give): the bucket gets the NAR once. While
//! one path's NAR goes up, the others with the same BLAKE3 wait for it; then they point their
//! narinfos at the object it put (checked still there with one HEAD) without compressing or
//! uploading it again. The last [`REMEMBERED`] NARs put are remembered, in memory: a NAR
//! shared with a path mirrored before that, or before a restart, goes up once more.

use std::collections::{HashMap, VecDeque};

use crate::db::MirrorState;

/// NARs put in the bucket remembered, at most.
pub const REMEMBERED: usize = 4096;

/// What the mirror knows of the NARs it puts, by BLAKE3.
#[derive(Debug, Default)]
pub struct SameNars {
    /// Uploads running (their task and path), and the paths with the same NAR waiting for them.
    running: HashMap<[u8; 32], Running>,
    /// Where NARs put lately are in the bucket.
    put: HashMap<[u8; 32], MirrorState>,
    order: VecDeque<[u8; 32]>,
}

#[derive(Debug)]
struct Running {
    task: tokio::task::Id,
    path: String,
    waiting: Vec<String>,
}

/// What a path's NAR job should do.
#[derive(Debug, PartialEq)]
pub enum Start {
    /// Another path's upload of the same NAR runs: wait for it ([`SameNars::ended`] names
    /// this path when it ends).
    Wait,
    /// Upload it, unless the object an identical NAR was put at lately is still there.
    Go(Option<MirrorState>),
}

impl SameNars {
    /// The NAR job of path `hash`, whose NAR is `blake3`, is about to start.
    pub fn starting(&mut self, blake3: &[u8; 32], hash: &str) -> Start {
        if let Some(r) = self.running.get_mut(blake3) {
            if r.path != hash && !r.waiting.iter().any(|h| h == hash) {
                r.waiting.push(hash.to_owned());
            }
            return Start::Wait;
        }
        Start::Go(self.put.get(blake3).cloned())
    }

    /// The job of [`Start::Go`] for path `hash` runs as task `id`.
    pub fn started(&mut self, blake3: [u8; 32], hash: &str, id: tokio::task::Id) {
        self.running.insert(
            blake3,
            Running {
                task: id,
                path: hash.to_owned(),
                waiting: Vec::new(),
            },
        );
    }

    /// The upload of `blake3` ended, its NAR put at `state` if it succeeded: the paths that
    /// waited for it.
    pub fn ended(&mut self, blake3: &[u8; 32], state: Option<&MirrorState>) -> Vec<String> {
        if let Some(s @ MirrorState::NarStored { .. }) = state
            && self.put.insert(*blake3, s.clone()).is_none()
        {
            self.order.push_back(*blake3);
            if self.order.len() > REMEMBERED
                && let Some(old) = self.order.pop_front()
            {
                self.put.remove(&old);
            }
        }
        self.running
            .remove(blake3)
            .map(|r| r.waiting)
            .unwrap_or_default()
    }

    /// Task `id` ended without an outcome (it panicked): the paths that waited for it.
    pub fn lost(&mut self, id: tokio::task::Id) -> Vec<String> {
        let Some(b) = self
            .running
            .iter()
            .find_map(|(b, r)| (r.task == id).then_some(*b))
        else {
            return Vec::new();
        };
        self.running
            .remove(&b)
            .map(|r| r.waiting)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: u8) -> MirrorState {
        MirrorState::NarStored {
            url: format!("nar/{n}.nar.zst"),
            compression: "zstd".into(),
            file_hash: [n; 32],
            file_size: 100,
            blake3: Some([n; 32]),
        }
    }

    #[tokio::test]
    async fn a_nar_goes_up_once_and_identical_ones_wait_then_point_at_it() {
        let mut s = SameNars::default();
        let task = tokio::spawn(async {});
        assert_eq!(s.starting(&[1; 32], "a"), Start::Go(None));
        s.started([1; 32], "a", task.id());
        assert_eq!(s.starting(&[1; 32], "a"), Start::Wait, "not its own waiter");
        assert_eq!(s.starting(&[1; 32], "b"), Start::Wait);
        assert_eq!(s.starting(&[1; 32], "b"), Start::Wait, "named once");
        assert_eq!(s.starting(&[2; 32], "c"), Start::Go(None), "another NAR");
        assert_eq!(s.ended(&[1; 32], Some(&stored(1))), vec!["b".to_owned()]);
        assert_eq!(s.starting(&[1; 32], "b"), Start::Go(Some(stored(1))));
        // A failed upload remembers nothing; a lost task gives its waiting paths back.
        s.started([3; 32], "c", task.id());
        assert_eq!(s.starting(&[3; 32], "d"), Start::Wait);
        assert_eq!(s.ended(&[3; 32], None), vec!["d".to_owned()]);
        assert_eq!(s.starting(&[3; 32], "d"), Start::Go(None));
        s.started([3; 32], "d", task.id());
        assert_eq!(s.starting(&[3; 32], "e"), Start::Wait);
        assert_eq!(s.lost(task.id()), vec!["e".to_owned()]);
        assert!(s.lost(task.id()).is_empty());
        assert_eq!(s.starting(&[3; 32], "e"), Start::Go(None));
    }

    #[test]
    fn only_the_last_nars_put_are_remembered() {
        let mut s = SameNars::default();
        for i in 0..=REMEMBERED as u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            s.ended(&b, Some(&stored(1)));
        }
        assert_eq!(s.put.len(), REMEMBERED);
        assert_eq!(
            s.starting(&[0; 32], "x"),
            Start::Go(None),
            "the oldest went"
        );
    }
}
