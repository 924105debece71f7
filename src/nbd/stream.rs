//! A client connection: TCP or a unix socket, behind one type.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(d),
            Stream::Unix(s) => s.set_read_timeout(d),
        }
    }
    /// Writes a message whose first `header_len` bytes are its header: on TCP the header is
    /// queued with MSG_MORE and the rest written after it (for large payloads that halves
    /// how often the reader wakes, see REPLY_QUEUED_MAX_BYTES in transmission.rs); on a unix socket, one
    /// write.
    pub fn write_all_header_corked(&self, message: &[u8], header_len: usize) -> io::Result<()> {
        let Stream::Tcp(s) = self else {
            return { self }.write_all(message);
        };
        let (mut bytes, payload) = message.split_at(header_len);
        while !bytes.is_empty() {
            // SAFETY: a plain send(2) from a live slice on an open socket.
            let n = unsafe {
                libc::send(
                    s.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n as usize..];
        }
        { self }.write_all(payload)
    }
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Stream::Unix(_) => "unix".into(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A corked header and its payload arrive intact and in order, on TCP and unix sockets.
    #[test]
    fn corked_header_then_payload_arrive_in_order() {
        let payload: Vec<u8> = (0..(3 << 20) + 5u32).map(|i| (i % 251) as u8).collect();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let tcp = (Stream::Tcp(l.accept().unwrap().0), Stream::Tcp(client));
        let (a, b) = UnixStream::pair().unwrap();
        let unix = (Stream::Unix(a), Stream::Unix(b));
        for (server, client) in [tcp, unix] {
            let want = payload.clone();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; 16 + want.len()];
                { &client }.read_exact(&mut got).unwrap();
                assert_eq!(&got[..16], b"header-16-bytes!");
                assert!(got[16..] == want[..], "payload differs");
            });
            let mut message = b"header-16-bytes!".to_vec();
            message.extend_from_slice(&payload);
            server.write_all_header_corked(&message, 16).unwrap();
            reader.join().unwrap();
        }
    }
}
