//! The mirror's uploads: started as the plan decides and the throttle allows (a NAR going up
//! for another path is not started twice), and finished: recorded in one commit, or retried
//! with backoff; a failure of the bucket itself pauses them until a probe answers.

use super::*;

impl Mirror {
    /// Start uploads, as the plan decides, up to what the throttle allows.
    pub(super) fn schedule(&mut self, tasks: &mut JoinSet<Outcome>) {
        if self.pause.is_paused() {
            return;
        }
        // A job set aside (its NAR's upload runs for another path) takes no room: ask again.
        // Each job handed out is busy in the plan from then on, so this ends.
        loop {
            let room = self.throttle.allowed().saturating_sub(tasks.len());
            let jobs = self.plan.next_jobs(Instant::now(), room);
            if jobs.is_empty() {
                return;
            }
            self.start_jobs(jobs, tasks);
        }
    }

    /// Start these uploads (a NAR job whose NAR goes up for another path is set aside).
    fn start_jobs(&mut self, jobs: Vec<Job>, tasks: &mut JoinSet<Outcome>) {
        for job in jobs {
            match job {
                Job::Nar(hash) => {
                    let Some(rec) = self.entries.get(&hash).cloned() else {
                        continue;
                    };
                    let b = rec.blake3;
                    let put = match self.same.starting(&b, &hash) {
                        same::Start::Go(put) => put,
                        // Set aside until the upload of the same NAR ends: it stays busy in the
                        // plan (as every job handed out) until `resume`.
                        same::Start::Wait => continue,
                    };
                    let job = NarJob {
                        tmp: self.tmp.join(format!("{hash}.nar")),
                        rec,
                        how: self.cfg.compression,
                        storage: self.storage.clone(),
                        bucket: self.bucket.clone(),
                        db: self.db.clone(),
                        check_first: self.tried.contains(&hash),
                        compressing: self.compressing.clone(),
                        arriving: self.arriving.clone(),
                    };
                    let path = hash.clone();
                    let task = tasks.spawn(async move {
                        if crate::killpoint::fault("mirror.nar-task-panics") {
                            panic!("a fault injected into a NAR upload task");
                        }
                        if let Some(state) = put
                            && job.still_there(&state).await
                        {
                            return Outcome {
                                hash,
                                nar: Some(b),
                                result: Ok(state),
                                bytes: 0,
                                streamed: false,
                            };
                        }
                        let (result, streamed) = match job.run().await {
                            Ok((state, streamed)) => (Ok(state), streamed),
                            Err(e) => (Err(e), false),
                        };
                        let bytes = match &result {
                            Ok(MirrorState::NarStored { file_size, .. }) => *file_size,
                            _ => 0,
                        };
                        Outcome {
                            hash,
                            nar: Some(b),
                            result,
                            bytes,
                            streamed,
                        }
                    });
                    self.same.started(b, &path, task.id());
                    self.running.insert(task.id(), path);
                }
                Job::Narinfo(hash) => {
                    let Some(rec) = self.entries.get(&hash).cloned() else {
                        continue;
                    };
                    let (bucket, state) = (self.bucket.clone(), self.state_of(&hash));
                    let path = hash.clone();
                    let task = tasks.spawn(async move {
                        if crate::killpoint::fault("mirror.narinfo-task-panics") {
                            panic!("a fault injected into a narinfo upload task");
                        }
                        let result = match state {
                            Some(s) => put_narinfo(&bucket, &rec, &s)
                                .await
                                .map(|()| MirrorState::Done),
                            None => Err(JobError::Other("no state".into())),
                        };
                        Outcome {
                            hash,
                            nar: None,
                            result,
                            bytes: 0,
                            streamed: false,
                        }
                    });
                    self.running.insert(task.id(), path);
                }
            }
        }
    }

    /// Where a path's NAR is in the bucket (the state its narinfo is written from).
    fn state_of(&self, hash: &str) -> Option<MirrorState> {
        self.stored.get(hash).cloned()
    }

    /// Record finished uploads (one commit) and plan retries for failed ones.
    pub(super) async fn finish(
        &mut self,
        done: Vec<Result<(tokio::task::Id, Outcome), tokio::task::JoinError>>,
    ) {
        if done.is_empty() {
            return;
        }
        let mut updates = Vec::new();
        let mut failed = Vec::new();
        let mut shared = 0;
        for r in done {
            let out = match r {
                Ok((id, o)) => {
                    self.running.remove(&id);
                    o
                }
                Err(e) => {
                    // It panicked: its path is tried again, like a failed one, and the paths
                    // that waited for its NAR are ready again.
                    tracing::error!("mirror: an upload task failed: {e}");
                    for h in self.same.lost(e.id()) {
                        self.plan.resume(&h);
                    }
                    if let Some(path) = self.running.remove(&e.id()) {
                        failed.push((
                            path,
                            JobError::Other(format!("the upload task failed: {e}")),
                        ));
                    }
                    continue;
                }
            };
            if let Some(b) = &out.nar {
                // The paths set aside for this upload: ready again (to point at what it put, or
                // to try it themselves).
                for h in self.same.ended(b, out.result.as_ref().ok()) {
                    self.plan.resume(&h);
                }
            }
            match out.result {
                Err(JobError::NotHere) => self.plan.not_held(&out.hash),
                // Only a NAR job that pointed at an identical NAR's object puts no bytes: no
                // upload, so no news for the throttle.
                Ok(state) if out.nar.is_some() && out.bytes == 0 => {
                    shared += 1;
                    updates.push((out.hash, state));
                }
                Ok(state) => {
                    self.throttle.success();
                    self.pause.uploaded();
                    if out.streamed {
                        self.metrics.mirror_streamed_nars.inc();
                    }
                    if out.bytes > 0 {
                        self.metrics.mirror_uploaded_bytes.inc_by(out.bytes);
                        self.stats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .completed(out.bytes);
                    }
                    updates.push((out.hash, state));
                }
                Err(e) => {
                    if matches!(e, JobError::SlowDown(_)) {
                        self.throttle.slow_down();
                        if let Some(more) = self.slow_log.allow() {
                            let more = if more > 0 {
                                format!(" ({more} more such answers meanwhile)")
                            } else {
                                String::new()
                            };
                            tracing::info!(
                                "mirror: the bucket asked to slow down: {} upload(s) at \
                                 once{more}",
                                self.throttle.allowed()
                            );
                        }
                    }
                    failed.push((out.hash, e));
                }
            }
        }
        self.metrics
            .mirror_upload_slots
            .set(self.throttle.allowed() as i64);
        let db = self.db.clone();
        let batch = updates.clone();
        let committed = tokio::task::spawn_blocking(move || {
            if !batch.is_empty() && crate::killpoint::fault("mirror.commit-fails") {
                return Err(crate::db::DbError::Injected);
            }
            db.outbox_set(&batch)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let now = Instant::now();
        let any_ok = committed.is_ok() && !updates.is_empty();
        let mut others = Vec::new();
        match committed {
            Err(e) => {
                // Nothing advanced: the same steps run again later (each is idempotent).
                tracing::error!("mirror: recording progress: {e}");
                for (h, _) in &updates {
                    self.plan.failed(h, now);
                }
                updates.clear();
            }
            Ok(released) => {
                self.metrics.mirror_shared_nars.inc_by(shared);
                others = released;
            }
        }
        for (h, state) in updates {
            if state == MirrorState::Done {
                self.plan.done(&h);
                self.stored.remove(&h);
                self.tried.remove(&h);
                if let Some(e) = self.entries.remove(&h) {
                    self.storage.release(&[e.blake3]);
                }
                self.metrics.mirror_uploaded_paths.inc();
            } else {
                self.stored.insert(h.clone(), state.clone());
                self.plan.nar_stored(&h, state);
            }
        }
        // Every build of the paths done or whose NAR went up (the eviction guard kept every
        // build of a path whose NAR was not up; a narinfo needs none), unless a path still in
        // the plan waits for the same bytes.
        others.retain(|b| !self.storage.is_released(b));
        if !others.is_empty() {
            let waited: std::collections::HashSet<[u8; 32]> = self
                .entries
                .iter()
                .filter(|(h, _)| self.plan.needs_nar(h))
                .map(|(_, e)| e.blake3)
                .collect();
            others.retain(|b| !waited.contains(b));
            self.storage.release(&others);
        }
        if any_ok && failed.is_empty() {
            self.set_error(None);
        }
        for (h, e) in failed {
            self.metrics.mirror_failures.inc();
            self.tried.insert(h.clone());
            let wait = self.plan.failed(&h, now);
            let path = self
                .entries
                .get(&h)
                .map_or(h.clone(), |e| e.store_path.clone());
            if let JobError::Bucket(why) = &e {
                // Every upload would fail alike: none starts until the bucket answers.
                tracing::debug!("mirror: {path}: {e}");
                if let Some(wait) = self.pause.bucket_failed(now) {
                    tracing::error!(
                        "mirror: {why}; uploads paused until the bucket answers (asked in \
                         {wait:?})"
                    );
                }
                self.set_error(Some(why.clone()));
                continue;
            }
            tracing::warn!("mirror: {path}: {e}; retrying in {wait:?}");
            self.set_error(Some(format!("{path}: {e}")));
        }
    }

    /// What a probe of the paused bucket found: uploads resume once it answers.
    pub(super) fn probed(&mut self, r: Result<(), s3::S3Error>) {
        match r {
            Ok(()) => {
                if self.pause.probe_answered() {
                    tracing::info!(
                        "mirror: bucket {} answers again; uploads resume",
                        self.bucket.name()
                    );
                    self.set_error(None);
                }
            }
            Err(e) => {
                if let Some(wait) = self.pause.probe_failed(Instant::now()) {
                    tracing::warn!("mirror: {e}; uploads stay paused (asked again in {wait:?})");
                    self.record_failure(e.to_string());
                }
            }
        }
    }
}
