//! `narmesh serve`: builds the node's parts, runs them, and owns the shutdown order
//! (stop taking requests -> finish the batch in hand -> stop the mirror -> close the mesh).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use narmesh_proto::control::StatusReport;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Replicate};
use crate::db::Db;
use crate::http::{self, HttpState, Serves};
use crate::ingest::Ingest;
use crate::mesh::{MeshHandle, MeshParts};
use crate::metrics::Metrics;
use crate::mirror::{MirrorHandle, MirrorParts};
use crate::nix::SecretKey;
use crate::pipeline::Pipeline;
use crate::queue::QueueHandle;
use crate::storage::{Storage, StorageConfig};
use crate::store::LocalStore;

/// Run the node until SIGINT or SIGTERM.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    run(cfg, cancel).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Run the node until `cancel` fires.
pub async fn run(mut cfg: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    if cfg.mirror.s3.is_some() && cfg.mesh.replicate != Replicate::Eager {
        tracing::info!("mirror node: replicating eagerly");
        cfg.mesh.replicate = Replicate::Eager;
    }
    // Vital work that ends before `cancel` stops the node, with a failure (see `vital`).
    let (vital, mut ended) = crate::vital::Vital::new(cancel.clone());
    // Whatever the node creates is its own unless said otherwise (keys, databases, NARs).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let gid = cfg.socket_gid()?;
    let spool = cfg.spool_dir();
    // With a socket group, the data dir lets the group through (not list it) to the spool.
    let data_mode = if gid.is_some() && spool.starts_with(&cfg.data_dir) {
        0o711
    } else {
        0o700
    };
    crate::fsutil::create_dir_mode(&cfg.data_dir, data_mode)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    prepare_spool(&spool, gid)?;
    let key = load_or_make_key(&cfg)?;
    println!("narmesh: public key {}", key.public());
    let db = Db::open(&cfg.data_dir.join("narmesh.redb")).context("opening the node database")?;
    // Ingest, pipeline and storage each get their own connection to the store database, so a
    // slow batch never delays a hook.
    let open_store = || Arc::new(LocalStore::new(&cfg.nix.store_root));
    let metrics = Arc::new(Metrics::new());
    let depth = metrics.queue_depth.clone();
    db.observe_queue_depth(move |d| {
        depth.set(d as i64);
    });
    let storage = {
        let (dir, db, store, metrics) = (
            cfg.data_dir.clone(),
            db.clone(),
            open_store(),
            metrics.clone(),
        );
        let scfg = StorageConfig {
            max_size: cfg.store.max_size.0,
            min_free: cfg.store.min_free.0,
            gc_interval: std::time::Duration::from_secs(cfg.store.gc_check_secs),
            mirror: cfg.mirror.s3.is_some(),
            read_memory: cfg.store.read_memory.0,
            vital: vital.clone(),
        };
        tokio::task::spawn_blocking(move || Storage::open(&dir, db, store, scfg, metrics))
            .await?
            .context("opening the storage")?
    };
    let wake = Arc::new(Notify::new());
    let (recorded, _) = broadcast::channel(4096);
    let mesh = if cfg.mesh.enabled {
        let parts = MeshParts {
            cfg: cfg.mesh.clone(),
            data_dir: cfg.data_dir.clone(),
            db: db.clone(),
            storage: storage.clone(),
            key: key.clone(),
            // This node's own signatures count too: its paths come back from peers that
            // fetched them, and must not be refused (nor the peer held off for it).
            trusted: {
                let mut keys = cfg.trusted_keys()?.keys().to_vec();
                let own = key.public();
                if !keys.contains(&own) {
                    keys.push(own);
                }
                crate::nix::TrustedKeys::new(keys)
            },
            recorded: recorded.subscribe(),
            metrics: metrics.clone(),
            max_nar_size: cfg.max_nar_size(),
            forget_after_secs: cfg.store.forget_after_secs,
            vital: vital.clone(),
        };
        Some(MeshHandle::start(parts, cancel.child_token()).await?)
    } else {
        None
    };

    let mirror_cancel = CancellationToken::new();
    let mirror = cfg.mirror.s3.clone().map(|s3| {
        MirrorHandle::start(
            MirrorParts {
                cfg: s3,
                data_dir: cfg.data_dir.clone(),
                db: db.clone(),
                storage: storage.clone(),
                metrics: metrics.clone(),
                arriving: mesh.as_ref().map(MeshHandle::arriving),
                me: mesh.as_ref().map(MeshHandle::endpoint_bytes),
                vital: vital.clone(),
            },
            mirror_cancel.clone(),
        )
    });

    let mut http_addrs = Vec::new();
    let mut metrics_addrs = Vec::new();
    let mut http_listeners = Vec::new();
    let listens = (cfg.http.listen.iter().map(|a| (a, Serves::Cache))).chain(
        cfg.http
            .metrics_listen
            .iter()
            .map(|a| (a, Serves::MetricsOnly)),
    );
    for (addr, serves) in listens {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding HTTP on {addr}"))?;
        let bound = l.local_addr()?.to_string();
        match serves {
            Serves::Cache => http_addrs.push(bound),
            Serves::MetricsOnly => metrics_addrs.push(bound),
        }
        http_listeners.push((l, serves));
    }
    let socket = bind_socket(&cfg.socket, gid)?;
    let status = StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        public_key: key.public().to_string(),
        socket: cfg.socket.display().to_string(),
        http_listen: http_addrs.clone(),
        endpoint_id: mesh.as_ref().map(|m| m.endpoint_id()).unwrap_or_default(),
        peer_address: mesh.as_ref().map(|m| m.peer_address()).unwrap_or_default(),
        ..Default::default()
    };
    let front = CancellationToken::new();
    let (ingest, front_runtime) = front_thread(
        IngestParts {
            db: db.clone(),
            store: open_store(),
            metrics: metrics.clone(),
            status: Arc::new(status),
            mesh: mesh.clone(),
            mirror: mirror.as_ref().map(|(h, _)| h.clone()),
            spool: spool.clone(),
            storage: storage.clone(),
            wake: wake.clone(),
            main: tokio::runtime::Handle::current(),
            vital: vital.clone(),
        },
        socket,
        front.clone(),
    )?;
    let pipeline = Pipeline {
        db: db.clone(),
        store: open_store(),
        key,
        upstream: cfg.upstream_trusted_keys()?,
        workers: cfg.pipeline.workers,
        hashing: crate::background::Background::new("narmesh-hash", cfg.pipeline.workers),
        batch: cfg.pipeline.batch,
        wake,
        metrics: metrics.clone(),
        recorded,
    };
    let http_state = HttpState::new(
        db.clone(),
        storage.clone(),
        metrics.clone(),
        cfg.http.priority,
        std::time::Duration::from_micros(cfg.http.busy_poll_us),
        std::time::Duration::from_secs(cfg.http.idle_secs),
        mesh.clone(),
    );
    vital.spawn("http narinfo cache", http_state.follow_changes());

    let (http, http_runtime) = http_thread(
        http_listeners,
        http_state,
        front.clone(),
        vital.guard("http"),
    )?;
    let back = CancellationToken::new();
    let pipeline_task = vital.spawn("pipeline", pipeline.run(back.clone()));
    let storage_task = vital.spawn("storage housekeeping", storage.clone().run(back.clone()));
    let forget_task = vital.spawn(
        "forgetting",
        crate::forget::Forgetting {
            db: db.clone(),
            storage: storage.clone(),
            me: mesh.as_ref().map(MeshHandle::endpoint_bytes),
            after_secs: cfg.store.forget_after_secs,
            mirror: cfg.mirror.s3.is_some(),
            metrics: metrics.clone(),
        }
        .run(back.clone()),
    );
    tracing::info!(
        "serving: socket {}, http {}{}",
        cfg.socket.display(),
        http_addrs.join(", "),
        if metrics_addrs.is_empty() {
            String::new()
        } else {
            format!(", metrics only {}", metrics_addrs.join(", "))
        }
    );
    let watchdog = crate::watchdog::Watchdog::start(
        vec![
            ("front", front_runtime),
            ("http", http_runtime),
            ("main", tokio::runtime::Handle::current()),
        ],
        crate::db::writes::stalled_for,
        metrics.clone(),
        crate::systemd::watchdog_interval(),
    )?;
    // `systemctl start` returns only once `narmesh status` and the hook can reach the node.
    crate::systemd::notify("READY=1");

    drop(vital);
    let died = tokio::select! {
        _ = cancel.cancelled() => None,
        e = ended.recv() => e,
    };
    if let Some(e) = &died {
        tracing::error!("{e}: the node stops, to be started again by its service manager");
        cancel.cancel();
    }
    // Stopping, whatever stops it: systemd's watchdog is off from here (no WATCHDOG=1 may
    // follow, which would arm it again), and its stop timeout applies instead (a shutdown that
    // finishes the batch in hand may take longer than the watchdog's interval).
    watchdog.stop();
    crate::systemd::notify("STOPPING=1");
    front.cancel();
    let _ = tokio::task::spawn_blocking(move || (ingest.join(), http.join())).await;
    back.cancel();
    let _ = pipeline_task.await;
    let _ = storage_task.await;
    let _ = forget_task.await;
    mirror_cancel.cancel();
    if let Some((_, task)) = mirror {
        let _ = task.await;
    }
    if let Some(m) = &mesh {
        m.shutdown().await;
    }
    // The process may end before every handle to the database is gone (and redb closes it).
    let synced = tokio::task::spawn_blocking(move || db.sync()).await;
    if let Err(e) = synced
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        tracing::warn!("database: the last commit: {e}");
    }
    let _ = std::fs::remove_file(&cfg.socket);
    match died {
        Some(e) => Err(anyhow::anyhow!("{e}")),
        None => Ok(()),
    }
}

/// What the front (hook reports and CLI requests) needs.
struct IngestParts {
    db: Db,
    store: Arc<LocalStore>,
    metrics: Arc<Metrics>,
    status: Arc<StatusReport>,
    mesh: Option<MeshHandle>,
    mirror: Option<crate::mirror::MirrorHandle>,
    spool: PathBuf,
    storage: Storage,
    /// Notified after every queue commit (the pipeline listens).
    wake: Arc<Notify>,
    /// The main runtime, for every request but a hook report.
    main: tokio::runtime::Handle,
    /// The node's watch over the front (its thread, queue writer and spool watcher).
    vital: crate::vital::Vital,
}

/// Run the front on a thread and runtime of its own at normal priority: a hook's
/// acknowledgement (validation, the fsync'd queue commit) never waits for the node's bulk work
/// (hashing, transfers, the mirror), which runs at a lower priority on the main runtime. Both
/// steps run on this thread itself, with no hand-over to a blocking pool and back.
fn front_thread(
    p: IngestParts,
    socket: std::os::unix::net::UnixListener,
    cancel: CancellationToken,
) -> anyhow::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let guard = p.vital.guard("front");
    runtime_thread("narmesh-front", None, guard, move || async move {
        let (queue, queue_task) = QueueHandle::spawn(
            p.db.clone(),
            p.wake,
            p.metrics.clone(),
            p.vital.guard("queue writer"),
        );
        let socket = match UnixListener::from_std(socket) {
            Ok(s) => s,
            Err(e) => return tracing::error!("socket: {e}"),
        };
        let ingest = Ingest {
            queue,
            db: p.db,
            front_store: Arc::new(LocalStore::waiting(
                p.store.root(),
                crate::ingest::FRONT_BUSY_WAIT,
            )),
            store: p.store,
            metrics: p.metrics,
            status: p.status,
            mesh: p.mesh,
            mirror: p.mirror,
            spool: p.spool.clone(),
            storage: p.storage,
            main: p.main,
        };
        let spool = p.vital.spawn(
            "spool watcher",
            ingest.clone().watch_spool(p.spool, cancel.clone()),
        );
        ingest.serve_socket(socket, cancel).await;
        let _ = spool.await;
        queue_task.abort();
    })
}

/// Serve the HTTP cache on a thread and runtime of its own at normal priority: a narinfo is
/// answered on the thread that read its request (no hand-over between worker threads, which at
/// one connection cost a quarter of nginx's rate), and never waits behind the node's bulk work.
/// NAR answers are handed to the main runtime (see `HttpState::main`).
fn http_thread(
    listeners: Vec<(TcpListener, Serves)>,
    state: HttpState,
    cancel: CancellationToken,
    guard: crate::vital::Guard,
) -> anyhow::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let listeners = listeners
        .into_iter()
        .map(|(l, serves)| Ok((l.into_std()?, serves)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let spin = state.spin.clone();
    let park: Box<dyn Fn() + Send + Sync> = Box::new(move || spin.before_park());
    runtime_thread("narmesh-http", Some(park), guard, move || async move {
        let tasks = tokio_util::task::TaskTracker::new();
        for (l, serves) in listeners {
            let l = match TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return tracing::error!("http listener: {e}"),
            };
            let (st, c) = (state.clone(), cancel.clone());
            tasks.spawn(http::serve(l, st, serves, c));
        }
        tasks.close();
        // A graceful shutdown waits for answers in flight; a client that stalls one
        // gets `HTTP_GRACE`, then its connection is dropped with the runtime.
        tokio::select! {
            _ = tasks.wait() => {}
            _ = async {
                cancel.cancelled().await;
                tokio::time::sleep(HTTP_GRACE).await;
            } => tracing::warn!(
                "http: answers still in flight {HTTP_GRACE:?} into shutdown; dropped"
            ),
        }
    })
}

/// How long a stopping node lets HTTP answers in flight finish.
const HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A thread named `name` with a current-thread runtime of its own, at the priority of the
/// thread that starts it (normal: the main runtime's workers run lower), running the future
/// `main` makes; `park` runs each time before the thread sleeps. Tasks left when the future
/// ends are dropped, and blocking work gets a second to finish.
fn runtime_thread<Fut>(
    name: &str,
    park: Option<Box<dyn Fn() + Send + Sync>>,
    guard: crate::vital::Guard,
    main: impl FnOnce() -> Fut + Send + 'static,
) -> anyhow::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)>
where
    Fut: std::future::Future<Output = ()>,
{
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().thread_name(name);
    if let Some(park) = park {
        builder.on_thread_park(park);
    }
    let rt = builder.build()?;
    let runtime = rt.handle().clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _guard = guard;
            rt.block_on(main());
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })?;
    Ok((thread, runtime))
}

/// The spool directory: the node's own (0700), or with a socket group, writable by the group
/// (setgid, so spooled files belong to it).
fn prepare_spool(spool: &Path, gid: Option<u32>) -> anyhow::Result<()> {
    let mode = if gid.is_some() { 0o2770 } else { 0o700 };
    crate::fsutil::create_dir_mode(spool, mode)
        .with_context(|| format!("creating spool dir {}", spool.display()))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(spool, None, Some(g))
            .with_context(|| format!("giving {} to group {g}", spool.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(spool, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Bind the Unix socket, replacing a stale one left by a killed node. Only the node's user (and
/// root) may connect, or also `socket-group`'s members.
fn bind_socket(path: &Path, gid: Option<u32>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // Made here (not by systemd's RuntimeDirectory): others may pass through to the socket.
        crate::fsutil::create_dir_mode(dir, 0o755)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another node is already listening on {}", path.display());
    }
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding socket {}", path.display()))?;
    l.set_nonblocking(true)?;
    // Who may report builds is who may have them signed with the host key, gossiped and
    // mirrored: not any local user.
    match gid {
        Some(g) => {
            std::os::unix::fs::chown(path, None, Some(g))
                .with_context(|| format!("giving {} to group {g}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?,
    }
    Ok(l)
}

/// The configured key, or the node's own (made once, kept in the data dir).
fn load_or_make_key(cfg: &Config) -> anyhow::Result<SecretKey> {
    let path: PathBuf = match &cfg.secret_key_file {
        Some(p) => p.clone(),
        None => {
            let p = cfg.data_dir.join("secret-key");
            if !p.exists() {
                let name = cfg
                    .key_name
                    .clone()
                    .unwrap_or_else(|| format!("{}-1", hostname()));
                let key = SecretKey::generate(&name)?;
                crate::fsutil::write_atomic(&p, key.to_nix_string().as_bytes(), 0o600)
                    .with_context(|| format!("writing {}", p.display()))?;
                tracing::info!("made a signing key {} in {}", key.public(), p.display());
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading secret key {}", path.display()))?;
    text.parse()
        .with_context(|| format!("secret key {}", path.display()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && crate::nix::SecretKey::generate(h).is_ok())
        .unwrap_or_else(|| "narmesh".to_owned())
}
