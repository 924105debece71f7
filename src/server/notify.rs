//! systemd readiness notification (`sd_notify(3)`'s protocol, no library): when the service
//! manager starts us with `Type=notify`, it sets `NOTIFY_SOCKET` to a unix datagram socket,
//! and one datagram of `KEY=VALUE` lines reports our state. `READY=1` goes out once the
//! listener is bound and the buffer store is open (connections are accepted from then on);
//! `STOPPING=1` when a signal starts the graceful shutdown.
//!
//! Without `NOTIFY_SOCKET` (started by hand, by a test, or `Type=simple`) nothing is sent.
//! A failed send is logged, never fatal: systemd then times the start out and says so.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Tells the service manager we accept connections; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}\n"));
}

/// Tells the service manager a graceful shutdown has begun.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests\n");
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return;
    };
    let path = path.to_string_lossy();
    if let Err(e) = send(&path, state) {
        log::warn!("cannot notify the service manager at {path:?}: {e}");
    }
}

/// Sends `state` as one datagram to `socket`: a path, or `@name` for a Linux abstract socket
/// (systemd uses one in some containers). Other forms (`vsock:`) are refused.
pub fn send(socket: &str, state: &str) -> std::io::Result<()> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)?
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "only a socket path or an @abstract name is supported",
        ));
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("mvps-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn unsupported_addresses_and_missing_sockets_fail() {
        assert!(send("vsock:2:1234", "READY=1\n").is_err());
        assert!(send("/nonexistent/mvps/notify", "READY=1\n").is_err());
    }
}
