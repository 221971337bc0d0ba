//! The service manager's notification socket (`NOTIFY_SOCKET`, as systemd sets it for a
//! `Type=notify` unit): `READY=1` once the node can be reached, `STOPPING=1` when it stops, and
//! the watchdog's interval (`WATCHDOG_USEC`) with its `WATCHDOG=1`. Without the variables,
//! nothing is sent.

use std::time::Duration;

/// Send `message` to the service manager, if it listens; a failure is logged, never fatal.
pub fn notify(message: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        // The manager reads what it is sent at once; a full queue is a failure, not a wait.
        sock.set_nonblocking(true)?;
        let addr = match path.strip_prefix('@') {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("telling the service manager {message:?} ({path}): {e}");
    }
}

/// The watchdog's interval (`WatchdogSec=`), when the service manager watches this process:
/// `WATCHDOG_USEC` set (and `WATCHDOG_PID`, if set, this process) and a socket to tell.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let interval = parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id());
    if interval.is_none()
        && let (Some(u), Some(p)) = (&usec, &pid)
    {
        // A wrapper that forked the node: systemd watches the wrapper, and kills it.
        tracing::warn!(
            "WATCHDOG_USEC={u} is for process {p}, not this one ({}): the watchdog is not \
             told; run the node itself as ExecStart= (or exec it)",
            std::process::id()
        );
    }
    interval
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        let s = Some(Duration::from_secs(60));
        assert_eq!(parse_watchdog(Some("60000000"), None, 7), s);
        assert_eq!(parse_watchdog(Some("60000000"), Some("7"), 7), s);
        assert_eq!(parse_watchdog(Some("60000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }
}
