//! What each fuzz target checks, for every parser of untrusted bytes: it must never panic, and
//! where an encoder exists, what it accepts must come out again the same after an encode and a
//! decode. The libFuzzer targets in `fuzz/` call these; `tests/corpus.rs` replays the corpora
//! (seeded from real Nix output and real node traffic) through them in every `cargo test`.

use narmesh_formats::{chunks, nix, range, route};
use narmesh_proto::{control, frame, gossip, sync};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A target's checks of one input.
pub type Check = fn(&[u8]);

/// Every target, by name (the directory of its corpus under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("hook_frame", hook_frame),
    ("control", control_messages),
    ("narinfo", narinfo),
    ("store_path", store_path),
    ("gossip", gossip_announce),
    ("sync", sync_messages),
    ("http_route", http_route),
    ("chunks", chunk_leaves),
];

/// Decode as `T`; if accepted, encoding it and decoding that must give the same bytes again.
fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let once = postcard::to_allocvec(&v).expect("what was decoded encodes");
        let back: T = postcard::from_bytes(&once).expect("what was encoded decodes");
        assert_eq!(
            postcard::to_allocvec(&back).expect("encodes"),
            once,
            "round trip"
        );
    }
}

/// A frame off the hook's socket: length prefix, size limit, then the envelope.
pub fn hook_frame(data: &[u8]) {
    let mut r = data;
    if let Ok(env) = frame::read_frame::<control::Envelope>(&mut r) {
        let mut out = Vec::new();
        frame::write_frame(&mut out, &env).expect("encodes");
        let mut again = out.as_slice();
        let back: control::Envelope = frame::read_frame(&mut again).expect("decodes");
        assert_eq!(frame::encode(&back).unwrap(), out);
    }
    let mut r = data;
    let _ = frame::read_frame::<control::Response>(&mut r);
    let _ = frame::decode::<control::Envelope>(data);
}

/// Control requests and answers (the CLI's and the hook's payloads).
pub fn control_messages(data: &[u8]) {
    round_trip::<control::Envelope>(data);
    round_trip::<control::Response>(data);
}

/// A narinfo from a peer or a bucket: what parses renders to text that parses to the same.
pub fn narinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = nix::NarInfo::parse(text) {
        let rendered = info.render();
        let again = nix::NarInfo::parse(&rendered).expect("a rendered narinfo parses");
        assert_eq!(again.render(), rendered, "render is stable");
        let _ = info.fingerprint();
    }
}

/// A store path from a hook, a peer or a URL.
pub fn store_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = nix::StorePath::parse(text) {
        assert_eq!(p.full(), text, "a store path prints as it was read");
        let _ = p.hash_part();
    }
    let _ = nix::base32::decode::<32>(text);
}

/// A gossip message of either version.
pub fn gossip_announce(data: &[u8]) {
    if let Ok(gossip::Incoming::V2(a)) = gossip::decode(data) {
        let _ = a.check_lengths();
    }
}

/// Catch-up and NAR transfer messages of both versions.
pub fn sync_messages(data: &[u8]) {
    round_trip::<sync::SyncRequest>(data);
    round_trip::<sync::SyncBatch>(data);
    round_trip::<sync::SyncBatchV2>(data);
    round_trip::<sync::NarRequest>(data);
    round_trip::<sync::NarHeader>(data);
    round_trip::<sync::NarQuery>(data);
    round_trip::<sync::NarReply>(data);
    round_trip::<sync::BulkAsk>(data);
    round_trip::<sync::BulkReply>(data);
    if let Ok(head) =
        <[u8; sync::BulkHeader::LEN]>::try_from(&data[..data.len().min(sync::BulkHeader::LEN)])
        && let Some(h) = sync::BulkHeader::decode(&head)
    {
        assert_eq!(h.encode(), head, "bulk header round trip");
    }
}

/// An HTTP path and a Range header against the binary cache.
pub fn http_route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (path, header) = text.split_once('\n').unwrap_or((&text, ""));
    match route::route(path) {
        route::Route::NarInfo(h) => assert_eq!(h.len(), 32),
        route::Route::BadRequest | route::Route::NotFound => {}
        other => {
            assert!(!path.contains(".."), "{other:?} for {path}");
        }
    }
    let len = data.len() as u64 * 1000;
    if let range::RangeAnswer::Partial { start, end } = range::parse(Some(header), len) {
        assert!(start <= end && end < len, "{start}..={end} of {len}");
    }
}

/// Chunk-group leaves from a peer, and checking data against them.
pub fn chunk_leaves(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 30);
    let rest = &data[8..];
    if let Ok(leaves) = chunks::Leaves::from_bytes(size, rest) {
        assert_eq!(leaves.to_bytes(), rest, "leaves round trip");
        let n = leaves.groups();
        assert_eq!(n, chunks::groups(size));
        let _ = leaves.root();
        if n > 0 {
            let _ = leaves.check(0, rest);
        }
    }
    let own = chunks::Leaves::of(rest);
    let i = chunks::groups(rest.len() as u64).saturating_sub(1);
    let r = chunks::group_range(rest.len() as u64, i);
    if !rest.is_empty() {
        assert!(own.check(i, &rest[r.start as usize..r.end as usize]));
    }
}
