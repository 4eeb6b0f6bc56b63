//! A one-file HTTP server on 127.0.0.1 for the download tests: each test starts its own, which answers every
//! request with one `Reply` (a body, a status, a cut or stalled body) and counts the requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone)]
pub enum Reply {
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// This status and a short body.
    Status(u16),
    /// 200 announcing the whole length, then only the first `n` bytes and a closed connection.
    CutAfter(Vec<u8>, usize),
    /// These bytes as soon as a client connects, without reading its request (a plain-HTTP server's
    /// answer to a TLS handshake).
    Immediately(Vec<u8>),
    /// 200 announcing the whole length, the first `n` bytes, then silence for a minute (a stalled server).
    Stall(Vec<u8>, usize),
}

pub struct Server {
    base: String,
    hits: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(reply: Reply) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = answer(stream, &reply);
            }
        });
        Server { base, hits }
    }

    /// The URL of `file` under a folder of the server (it answers every path the same).
    pub fn url(&self, file: &str) -> String {
        format!("{}/~kriz/{file}", self.base)
    }

    /// The server's root, as a mirror's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn answer(mut stream: TcpStream, reply: &Reply) -> std::io::Result<()> {
    if let Reply::Immediately(bytes) = reply {
        stream.write_all(bytes)?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    // Read the request head (a GET has no body).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    match reply {
        Reply::Body(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/x-gzip\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)?;
        }
        Reply::Status(code) => {
            let body = b"not here";
            write!(stream, "HTTP/1.1 {code} Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            stream.write_all(body)?;
        }
        Reply::CutAfter(body, n) => {
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            stream.write_all(&body[..*n])?;
        }
        Reply::Stall(body, n) => {
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            stream.write_all(&body[..*n])?;
            stream.flush()?;
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        Reply::Immediately(_) => {}
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}
