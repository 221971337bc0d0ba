//! Power loss, not process loss: a SIGKILL leaves the page cache behind, so only the order of
//! system calls shows that an acknowledgement waits for the disk. The node runs under
//! `strace`; for each hook report, the fsync of the queue's file that covers the write holding
//! it must complete before the acknowledgement is written to the hook.

use std::collections::HashMap;
use std::path::Path;

use narmesh_proto::control::Response;

use crate::harness::{NixHost, require, run_hook};
use crate::node_harness::Node;

/// One system call from the trace, with the lines where it started and ended.
#[derive(Debug)]
struct Call {
    start: usize,
    end: usize,
    name: String,
    /// The path or socket strace's `-yy` names for the first argument.
    target: String,
    data: Vec<u8>,
}

/// Undo strace's C-string escapes (`-x`: `\xNN` for bytes that are not printable).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let c = b[i + 1];
            i += 2;
            match c {
                b'x' if i + 2 <= b.len() => {
                    out.push(u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0));
                    i += 2;
                }
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'v' => out.push(0x0b),
                b'f' => out.push(0x0c),
                b'0'..=b'7' => {
                    let mut v = (c - b'0') as u32;
                    while i < b.len() && (b'0'..=b'7').contains(&b[i]) && v < 32 {
                        v = v * 8 + (b[i] - b'0') as u32;
                        i += 1;
                    }
                    out.push(v as u8);
                }
                other => out.push(other),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The first argument's target (`5</path>` → `/path`) and the first quoted string.
fn parse_args(args: &str) -> (String, Vec<u8>) {
    let target = args
        .find('<')
        .and_then(|a| {
            // The target ends at the `>` that closes it (socket names hold no `>` but `->`).
            let rest = &args[a + 1..];
            let mut depth = 0usize;
            for (i, ch) in rest.char_indices() {
                match ch {
                    '[' => depth += 1,
                    ']' => depth = depth.saturating_sub(1),
                    '>' if depth == 0 && !rest[..i].ends_with('-') => {
                        return Some(rest[..i].to_owned());
                    }
                    _ => {}
                }
            }
            None
        })
        .unwrap_or_default();
    let data = match args.find(", \"") {
        Some(q) => {
            let rest = &args[q + 3..];
            let mut end = 0;
            let bytes = rest.as_bytes();
            while end < bytes.len() {
                if bytes[end] == b'\\' {
                    end += 2;
                    continue;
                }
                if bytes[end] == b'"' {
                    break;
                }
                end += 1;
            }
            unescape(&rest[..end.min(rest.len())])
        }
        None => Vec::new(),
    };
    (target, data)
}

/// The calls of an `strace -f -yy -x` log, unfinished ones joined with their resumption.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: HashMap<String, Call> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            if let Some(mut c) = pending.remove(pid)
                && resumed.starts_with(&c.name)
            {
                c.end = n;
                calls.push(c);
            }
            continue;
        }
        let Some(open) = rest.find('(') else { continue };
        let name = rest[..open].to_owned();
        let (target, data) = parse_args(&rest[open + 1..]);
        let call = Call {
            start: n,
            end: n,
            name,
            target,
            data,
        };
        if rest.ends_with("<unfinished ...>") {
            pending.insert(pid.to_owned(), call);
        } else {
            calls.push(call);
        }
    }
    calls
}

fn is_accepted(data: &[u8]) -> bool {
    let mut r = data;
    matches!(
        narmesh_proto::frame::read_frame::<Response>(&mut r),
        Ok(Response::Accepted { .. })
    )
}

/// Check the trace: for each path in order, its queue write, then an fsync of the queue file
/// started after that write and done before the path's acknowledgement. Returns what broke.
fn check(calls: &[Call], paths: &[String]) -> Result<(), String> {
    let queue = |c: &&Call| c.target.ends_with("queue.log");
    let writes: Vec<&Call> = calls
        .iter()
        .filter(queue)
        .filter(|c| c.name.starts_with("write") || c.name.starts_with("pwrite"))
        .collect();
    let syncs: Vec<&Call> = calls
        .iter()
        .filter(queue)
        .filter(|c| c.name == "fsync" || c.name == "fdatasync")
        .collect();
    let mut acks: Vec<&Call> = calls
        .iter()
        .filter(|c| c.target.contains("node.sock") && is_accepted(&c.data))
        .collect();
    acks.sort_by_key(|c| c.start);
    if acks.len() != paths.len() {
        return Err(format!(
            "{} acknowledgements in the trace for {} reports",
            acks.len(),
            paths.len()
        ));
    }
    for (path, ack) in paths.iter().zip(acks) {
        let w = writes
            .iter()
            .find(|w| w.data.windows(path.len()).any(|win| win == path.as_bytes()))
            .ok_or_else(|| format!("no write of {path} to the queue in the trace"))?;
        if w.end >= ack.start {
            return Err(format!(
                "{path} acknowledged before its queue write returned"
            ));
        }
        if !syncs.iter().any(|s| s.start > w.end && s.end < ack.start) {
            return Err(format!(
                "{path} acknowledged (trace line {}) with no fsync of the queue between its write (line {}) and the acknowledgement",
                ack.start + 1,
                w.end + 1
            ));
        }
    }
    Ok(())
}

fn traced_node(dir: &Path, host: &NixHost) -> (Node, std::path::PathBuf) {
    let trace = dir.join("trace");
    let mut node = Node::new(&dir.join("node"), &host.root);
    node.wrap = [
        "strace",
        "-f",
        "-qq",
        "-yy",
        "-x",
        "-s",
        "65536",
        "-e",
        "trace=write,writev,pwrite64,pwritev,sendto,sendmsg,fsync,fdatasync",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([trace.display().to_string()])
    .collect();
    (node, trace)
}

#[test]
fn every_acknowledgement_follows_the_fsync_of_its_report() {
    require("strace");
    let t = tempfile::tempdir().unwrap();
    let host = NixHost::new("");
    let paths: Vec<String> = host
        .build(r#"builtins.genList (i: mk "durable-${toString i}" "echo durable ${toString i} > $out") 8"#)
        .iter()
        .map(|p| p.full())
        .collect();
    let (mut node, trace) = traced_node(t.path(), &host);
    node.start();
    for p in &paths {
        // Tracing slows the node down: a generous deadline, so that every report is answered.
        let run = run_hook(&node.socket(), &node.spool(), "", p, 20_000);
        assert!(!run.stderr.contains("spooled"), "{}", run.stderr);
    }
    // SIGTERM to the node itself (strace, the harness's child, would wait for it), then the
    // usual clean stop, which strace reports as the node's exit.
    let ok = std::process::Command::new("pkill")
        .args(["-TERM", "-P", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "signalling the traced node");
    node.stop();
    let calls = parse_trace(&std::fs::read_to_string(&trace).unwrap());
    if let Err(e) = check(&calls, &paths) {
        panic!("{e}");
    }
}

/// The checker itself: a trace where the acknowledgement comes before the fsync fails.
#[test]
fn the_trace_check_refuses_an_ack_before_the_fsync() {
    let mut ack = Vec::new();
    narmesh_proto::frame::write_frame(&mut ack, &Response::Accepted { paths: 1 }).unwrap();
    let hex: String = ack.iter().map(|b| format!("\\x{b:02x}")).collect();
    let p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x";
    let good = format!(
        "10 write(5</d/queue.log>, \"\\x01{p}\", 40) = 40\n10 fdatasync(5</d/queue.log>) = 0\n11 write(7<UNIX-STREAM:[1->2,\"/d/node.sock\"]>, \"{hex}\", {}) = {}\n",
        ack.len(),
        ack.len()
    );
    assert_eq!(check(&parse_trace(&good), &[p.to_owned()]), Ok(()));
    let bad = format!(
        "10 write(5</d/queue.log>, \"\\x01{p}\", 40) = 40\n11 write(7<UNIX-STREAM:[1->2,\"/d/node.sock\"]>, \"{hex}\", {}) = {}\n10 fdatasync(5</d/queue.log>) = 0\n",
        ack.len(),
        ack.len()
    );
    assert!(check(&parse_trace(&bad), &[p.to_owned()]).is_err());
    let unfinished = format!(
        "10 write(5</d/queue.log>, \"\\x01{p}\", 40) = 40\n10 fdatasync(5</d/queue.log> <unfinished ...>\n11 write(7<UNIX-STREAM:[1->2,\"/d/node.sock\"]>, \"{hex}\", {}) = {}\n10 <... fdatasync resumed>) = 0\n",
        ack.len(),
        ack.len()
    );
    assert!(check(&parse_trace(&unfinished), &[p.to_owned()]).is_err());
}
