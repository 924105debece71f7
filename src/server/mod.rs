//! The listener: accepts connections (TCP or unix socket), runs each on its own thread
//! (handshake, then transmission), and shuts down gracefully on SIGTERM/SIGINT.

pub mod exports;
pub mod fence;
pub mod notify;
pub mod signals;

use crate::limits::{CONNECTIONS_MAX, HANDSHAKE_TIMEOUT_MS};
use crate::nbd::{handshake, stream::Stream, transmission, Exports};
use std::collections::HashMap;
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long shutdown waits for connections to finish their in-flight requests.
const SHUTDOWN_DRAIN_MS: u64 = 30_000;

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `HOST:PORT` or `unix:/path`.
    pub fn bind(addr: &str) -> Result<Listener, String> {
        if let Some(path) = addr.strip_prefix("unix:") {
            let p = PathBuf::from(path);
            // A stale socket file from a previous run blocks bind; remove only sockets.
            if let Ok(meta) = std::fs::symlink_metadata(&p) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket()
                    && std::os::unix::net::UnixStream::connect(&p).is_err()
                {
                    let _ = std::fs::remove_file(&p);
                }
            }
            let l = UnixListener::bind(&p).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            Ok(Listener::Unix(l, p))
        } else {
            let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            Ok(Listener::Tcp(l))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Live connections, so shutdown can stop their reads and wait for them.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Stream>>,
    cv: Condvar,
}

/// Serves until SIGTERM/SIGINT; then stops accepting, lets in-flight requests finish, and
/// returns.
pub fn serve(listener: Listener, exports: Arc<dyn Exports>) {
    signals::install(listener.raw_fd());
    // After the handlers: a SIGTERM sent as soon as systemd sees READY must find them.
    notify::ready(&format!("listening on {}", listener.describe()));
    let conns = Arc::new(Connections::default());
    let mut next_id = 0u64;
    while !signals::stop_requested() {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if !signals::stop_requested() {
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        next_id += 1;
        if let Err(e) = register(&conns, next_id, &stream) {
            log::warn!("{}: refused: {e}", stream.peer());
            continue;
        }
        let (conns2, exports2, id) = (conns.clone(), exports.clone(), next_id);
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .spawn(move || {
                handle(stream, exports2.as_ref());
                conns2.open.lock().unwrap().remove(&id);
                conns2.cv.notify_all();
            });
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
            conns.open.lock().unwrap().remove(&id);
        }
    }
    log::info!("shutting down: no new connections; finishing in-flight requests");
    notify::stopping();
    drain(&conns);
}

fn register(conns: &Connections, id: u64, stream: &Stream) -> Result<(), String> {
    let mut open = conns.open.lock().unwrap();
    if open.len() >= CONNECTIONS_MAX {
        return Err(format!("more than {CONNECTIONS_MAX} connections"));
    }
    open.insert(id, stream.try_clone().map_err(|e| e.to_string())?);
    Ok(())
}

fn drain(conns: &Connections) {
    // Stop reading new requests; replies to in-flight ones still go out.
    for s in conns.open.lock().unwrap().values() {
        let _ = s.shutdown(Shutdown::Read);
    }
    let mut open = conns.open.lock().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while !open.is_empty() {
        let now = std::time::Instant::now();
        if now >= deadline {
            log::warn!("{} connection(s) still busy at shutdown", open.len());
            break;
        }
        open = conns.cv.wait_timeout(open, deadline - now).unwrap().0;
    }
}

fn handle(stream: Stream, exports: &dyn Exports) {
    let peer = stream.peer();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)));
    let kill: crate::nbd::Kill = match stream.try_clone() {
        Ok(k) => Arc::new(move || {
            let _ = k.shutdown(Shutdown::Both);
        }),
        Err(e) => {
            log::error!("{peer}: {e}");
            return;
        }
    };
    let export = match handshake::run(&stream, exports, &peer, kill) {
        Ok(handshake::Outcome::Serve(e)) => e,
        Ok(handshake::Outcome::Closed(why)) => {
            log::info!("{peer}: handshake ended: {why}");
            return;
        }
        Err(e) => {
            log::info!("{peer}: handshake failed: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let label = export.label().to_string();
    let output = match stream.try_clone() {
        Ok(o) => o,
        Err(e) => {
            log::error!("{label}: {e}");
            return;
        }
    };
    if let Err(e) = transmission::serve(&stream, output, export) {
        log::info!("{label}: connection ended: {e}");
    }
    let _ = stream.shutdown(Shutdown::Both);
}
