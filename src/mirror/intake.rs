//! What comes into the mirror's plan: paths taken from the node's log into the outbox (and
//! again after an audit or a restart), with their records, their references' progress and
//! whether their NARs can be read here; and, for paths whose NAR is not here, what became of
//! it (arriving, offered by a peer, replaced by another claim of the path, or orphaned).

use super::*;

impl Mirror {
    /// Take paths into the plan: their records, states, whether their NARs are here, and which
    /// of their references are not complete in the bucket yet (looked up off the async threads).
    pub(super) async fn add(&mut self, recs: Vec<(PathRecord, MirrorState, bool)>) {
        if recs.is_empty() {
            return;
        }
        let recs: Vec<_> = recs
            .into_iter()
            .filter(|(r, _, _)| !self.plan.has(r.hash_part()))
            .collect();
        let hashes: Vec<String> = recs
            .iter()
            .map(|(r, ..)| r.hash_part().to_owned())
            .collect();
        // The claim each path uploads, as this node can read them, and whether its NAR is here
        // (off the async threads); the paths of which no claim can be uploaded.
        let (storage, arriving, me) = (self.storage.clone(), self.arriving.clone(), self.me);
        let Ok((entries, none)) = tokio::task::spawn_blocking(move || {
            let mut none = Vec::new();
            let entries = recs
                .into_iter()
                .filter_map(|(r, s, tried)| {
                    let readable = |b: &[u8; 32]| readable(&storage, arriving.as_ref(), b);
                    let served = r.served(me.as_ref(), |c| readable(&c.blake3));
                    let Some((e, s)) = Entry::choose(&r, s, served) else {
                        none.push(r.hash_part().to_owned());
                        return None;
                    };
                    let local = readable(&e.blake3);
                    Some((e, s, tried, local))
                })
                .collect::<Vec<(Entry, MirrorState, bool, bool)>>();
            (entries, none)
        })
        .await
        else {
            tracing::error!("mirror: choosing the claims to upload failed");
            self.unplanned.extend(hashes);
            return;
        };
        if !none.is_empty() {
            tracing::warn!(
                "mirror: {} path(s) with no claim to upload (every NAR failed its checks), e.g. \
                 {}: they wait for a record that brings another",
                none.len(),
                none[0]
            );
        }
        self.unplanned.extend(none);
        // References the plan knows are incomplete by definition; the others are asked.
        let mut ask: Vec<String> = entries
            .iter()
            .flat_map(|(e, ..)| e.references())
            .filter(|r| !self.plan.has(r))
            .collect();
        ask.sort();
        ask.dedup();
        let batch: std::collections::HashSet<String> =
            entries.iter().map(|(e, ..)| e.hash.clone()).collect();
        let db = self.db.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let done = db
                .outbox_done(&ask)
                .unwrap_or_else(|_| vec![false; ask.len()]);
            ask.into_iter().zip(done).collect::<HashMap<_, _>>()
        })
        .await;
        let Ok(done) = looked else {
            tracing::error!("mirror: looking up references failed");
            self.unplanned
                .extend(entries.into_iter().map(|(e, ..)| e.hash));
            return;
        };
        for (e, state, tried, local) in entries {
            self.unplanned.remove(&e.hash);
            let missing: Vec<String> = e
                .references()
                .into_iter()
                .filter(|r| {
                    batch.contains(r) || self.plan.has(r) || !done.get(r).copied().unwrap_or(false)
                })
                .collect();
            // Kept from eviction until its NAR is in the bucket.
            if state == MirrorState::Pending {
                self.storage.protect([e.blake3]);
            }
            if tried {
                self.tried.insert(e.hash.clone());
            }
            if matches!(state, MirrorState::NarStored { .. }) {
                self.stored.insert(e.hash.clone(), state.clone());
            }
            self.plan.add(&e.hash, state, local, e.nar_size, &missing);
            self.entries.insert(e.hash.clone(), e);
        }
    }

    /// What is looked at when news of changed records was lost: every path whose NAR is not
    /// here, and every path the plan could not take in.
    pub(super) fn news_lost(&self) -> Vec<String> {
        let not_local = self.plan.not_local().map(str::to_owned);
        not_local.chain(self.unplanned.iter().cloned()).collect()
    }

    /// Paths the plan could not take in before, as the outbox has them now (one it finished
    /// or forgot meanwhile is no longer waited for).
    async fn add_again(&mut self, hashes: Vec<String>) {
        let db = self.db.clone();
        let asked = hashes.clone();
        match tokio::task::spawn_blocking(move || db.outbox_unfinished_of(&asked)).await {
            Ok(Ok(open)) => {
                for h in &hashes {
                    self.unplanned.remove(h);
                }
                let open: Vec<_> = open.into_iter().map(|(r, s)| (r, s, true)).collect();
                self.add(open).await;
            }
            Ok(Err(e)) => tracing::warn!("mirror: reading the outbox: {e}"),
            Err(e) => tracing::warn!("mirror: reading the outbox: {e}"),
        }
    }

    /// Take newly logged paths into the outbox and the plan.
    pub(super) async fn take_new(&mut self) {
        loop {
            let (db, me) = (self.db.clone(), self.me);
            match tokio::task::spawn_blocking(move || db.outbox_take(TAKE, me.as_ref())).await {
                Ok(Ok((new, more))) => {
                    let new = new
                        .into_iter()
                        .map(|r| (r, MirrorState::Pending, false))
                        .collect();
                    self.add(new).await;
                    if !more {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!("mirror: taking new paths: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!("mirror: taking new paths: {e}");
                    return;
                }
            }
        }
    }

    /// Of these paths, those the plan waits for whose NAR is here now (or arriving: it is read
    /// as it comes) go ahead; of the others, one whose record serves another claim now that can
    /// be had takes it (`look`, `switch`), and those of which no claim can be had (every
    /// holder's Nix GC took it, or its cap evicted it, before this node fetched it) are
    /// orphaned: they, and the closures above them, wait until a node holds it again (news of
    /// that changes the record, which brings the path here again).
    pub(super) async fn refresh_held(&mut self, touched: Vec<String>) {
        let again: Vec<String> = touched
            .iter()
            .filter(|h| self.unplanned.contains(*h))
            .cloned()
            .collect();
        if !again.is_empty() {
            self.add_again(again).await;
        }
        let waiting: Vec<(String, [u8; 32], bool)> = touched
            .into_iter()
            .filter_map(|h| {
                let e = self.entries.get(&h)?;
                let waits = self.plan.waits_for_nar(&h);
                Some((h, e.blake3, waits))
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let (storage, arriving) = (self.storage.clone(), self.arriving.clone());
        let (db, me) = (self.db.clone(), self.me);
        let looked = tokio::task::spawn_blocking(move || {
            waiting
                .into_iter()
                .map(|(h, b, waits)| {
                    let seen = if readable(&storage, arriving.as_ref(), &b) {
                        Seen::Held
                    } else if !waits {
                        // Only a NAR not in the bucket yet is waited for.
                        Seen::Offered
                    } else {
                        look(&db, &storage, arriving.as_ref(), me.as_ref(), &h, &b)
                    };
                    (h, seen)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut newly = Vec::new();
        for (h, seen) in looked {
            let seen = match seen {
                Seen::Other(e, held, done) => self.switch(&h, e, held, &done),
                seen => seen,
            };
            match seen {
                Seen::Orphaned => {
                    if self.orphaned.insert(h.clone()) {
                        newly.push(h);
                    }
                }
                Seen::Held => {
                    self.orphaned.remove(&h);
                    self.plan.held(&h);
                }
                Seen::Offered => {
                    self.orphaned.remove(&h);
                }
                Seen::Other(..) => {}
            }
        }
        if let Some(first) = newly.first().and_then(|h| self.entries.get(h)) {
            tracing::warn!(
                "mirror: {} path(s) wait for a NAR that no node holds any more (the first: {}); \
                 they and what refers to them are mirrored once a node holds it again",
                newly.len(),
                first.store_path
            );
        }
    }

    /// Path `h` waits for a NAR, and its record serves `e` now (every holder of the first lost
    /// it and a node holds another build, or this node holds another build): the plan takes
    /// that claim instead, waiting for `e`'s references (`done`: those complete in the bucket)
    /// where they differ. Nothing of the first claim went to the bucket (the path waits for its
    /// NAR), so nothing is kept of it; the NAR that goes up notes its claim, and the narinfo
    /// follows that one.
    fn switch(&mut self, h: &str, e: Entry, held: bool, done: &HashMap<String, bool>) -> Seen {
        let Some(old) = self.entries.get(h) else {
            return Seen::Orphaned;
        };
        let (mut a, mut b) = (old.references(), e.references());
        a.sort();
        b.sort();
        if a != b {
            let missing: Vec<String> = b
                .iter()
                .filter(|r| self.plan.has(r) || !done.get(*r).copied().unwrap_or(false))
                .cloned()
                .collect();
            self.plan.rewire(h, &a, &missing);
        }
        tracing::info!(
            "mirror: {}: taking the build a node holds ({} bytes), not the one it waited for",
            e.store_path,
            e.nar_size
        );
        // The first claim's NAR is released unless another path waits for the same bytes.
        let first = old.blake3;
        if !self
            .entries
            .iter()
            .any(|(k, x)| k.as_str() != h && x.blake3 == first)
        {
            self.storage.release(&[first]);
        }
        self.storage.protect([e.blake3]);
        self.plan.resize(h, e.nar_size);
        self.entries.insert(h.to_owned(), e);
        if held {
            self.plan.held(h);
            Seen::Held
        } else {
            Seen::Offered
        }
    }
}

/// The paths that wait for a NAR not here yet to look at again without news of them: orphaned
/// ones only if `orphans_too`. (One whose NAR is in the bucket needs it no more.)
pub(super) fn to_recheck(
    plan: &Plan,
    orphaned: &std::collections::HashSet<String>,
    orphans_too: bool,
) -> Vec<String> {
    plan.not_local()
        .filter(|h| plan.waits_for_nar(h) && (orphans_too || !orphaned.contains(*h)))
        .map(str::to_owned)
        .collect()
}

/// What the mirror saw of a NAR it waits for.
enum Seen {
    /// Held here, or arriving from peers.
    Held,
    /// A peer says it holds it (or the path does not wait for it).
    Offered,
    /// The path serves another claim now, whose NAR can be had: its entry, whether it is held
    /// here (or arriving), and which of its references are complete in the bucket.
    Other(Entry, bool, HashMap<String, bool>),
    /// Nobody says they hold it, nor any other claim of the path.
    Orphaned,
}

/// What the NAR `blake3` of path `hash`, not readable here, is to the mirror now, by the rule
/// the eager fetches follow (`PathRecord::served`): the path still serves it and a peer says
/// it holds it (or the record could not be read: not taken for orphaned on a doubt); or the
/// path serves another claim whose NAR can be had (with which of that claim's references are
/// complete in the bucket); or no claim of the path can be had. Blocking.
fn look(
    db: &Db,
    storage: &Storage,
    arriving: Option<&Arriving>,
    me: Option<&[u8; 32]>,
    hash: &str,
    blake3: &[u8; 32],
) -> Seen {
    let rec = match db.path(hash) {
        Ok(Some(rec)) => rec,
        Ok(None) => return Seen::Orphaned,
        Err(_) => return Seen::Offered,
    };
    let mut held = false;
    let served = rec.obtainable(
        |c| {
            held = readable(storage, arriving, &c.blake3);
            held
        },
        |c| c.held_by_peer(me),
    );
    match served {
        Some(c) if c.blake3 == *blake3 => Seen::Offered,
        Some(c) => {
            let e = Entry::of(&rec, c);
            let refs = e.references();
            let done = db
                .outbox_done(&refs)
                .unwrap_or_else(|_| vec![false; refs.len()]);
            Seen::Other(e, held, refs.into_iter().zip(done).collect())
        }
        None => Seen::Orphaned,
    }
}

/// True if the NAR can be read now: held here, or arriving from peers. Blocking.
fn readable(storage: &Storage, arriving: Option<&Arriving>, blake3: &[u8; 32]) -> bool {
    storage.holds_blocking(blake3) || arriving.is_some_and(|a| a.is_arriving(blake3))
}
