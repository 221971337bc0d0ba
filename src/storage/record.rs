//! Recording NAR files fetched from peers: a file its fetch has synced and renamed into place
//! waits here for the commit that records it, shared with every file finished meanwhile: one
//! fsync of the NAR directory and one redb commit for the group (a commit rewrites a few dozen
//! pages of the database whatever it holds, so an eager node finishing small NARs one commit
//! each wrote about 110 KB per NAR). A group is what queued while the last commit ran: no file
//! waits for a timer. A leaf of the storage.

use std::path::PathBuf;
use std::sync::mpsc;

use crate::db::{Db, NarFile};

/// Files recorded in one commit at most.
const MAX_GROUP: usize = 256;

/// One finished file: what to record, and where its caller waits.
struct Job {
    blake3: [u8; 32],
    file: NarFile,
    leaves: Vec<u8>,
    reply: mpsc::SyncSender<Result<(), String>>,
}

/// The handle to the recording thread (it ends when the handle is dropped).
#[derive(Debug)]
pub(super) struct Recorder {
    tx: mpsc::Sender<Job>,
}

impl Recorder {
    /// Start the thread recording files of the NAR directory `dir` in `db`.
    pub(super) fn start(db: Db, dir: PathBuf, guard: crate::vital::Guard) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("narmesh-record".into())
            .spawn(move || {
                let _guard = guard;
                run(&db, &dir, &rx)
            })?;
        Ok(Recorder { tx })
    }

    /// Make `blake3`'s file (already synced and in place) durable in the directory and record
    /// it; returns once its group's commit is done. Blocking.
    pub(super) fn record(
        &self,
        blake3: [u8; 32],
        file: NarFile,
        leaves: &[u8],
    ) -> Result<(), String> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Job {
            blake3,
            file,
            leaves: leaves.to_vec(),
            reply,
        };
        self.tx
            .send(job)
            .map_err(|_| "the recording thread stopped".to_owned())?;
        answer
            .recv()
            .map_err(|_| "the recording thread stopped".to_owned())?
    }
}

fn run(db: &Db, dir: &std::path::Path, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // The renames first (a record never names a file a crash could lose), then the rows.
        let result = crate::fsutil::sync_dir(dir)
            .map_err(|e| format!("syncing {}: {e}", dir.display()))
            .and_then(|()| {
                let files: Vec<_> = group
                    .iter()
                    .map(|j| (j.blake3, j.file, j.leaves.as_slice()))
                    .collect();
                db.add_nar_files(&files).map_err(|e| e.to_string())
            });
        for job in group {
            let _ = job.reply.send(result.clone());
        }
    }
}
