//! A TCP proxy that holds every byte for a fixed time in each direction:
//! a long-haul network on loopback, for tests and benchmarks (this
//! machine's kernel has no netem).
//!
//! Each direction of each connection is a reader that timestamps what it
//! reads and a writer that forwards each piece once its delay has passed,
//! so latency is added without limiting bandwidth; a close is forwarded
//! as late as a last piece would be. At most [`MAX_IN_FLIGHT_PIECES`]
//! pieces wait per direction; beyond that the reader stops reading, as a
//! real link's buffers would.
//!
//! The kernel accepts a connection at once, so a client sees its connect
//! succeed without the round trip, and a target that refuses as a
//! connection closed after one.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Pieces (reads of up to 64 KiB) waiting in one direction.
pub const MAX_IN_FLIGHT_PIECES: usize = 1024;

/// A running proxy; it stops, with every connection through it, when
/// dropped.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where to connect instead of the target.
    pub address: SocketAddr,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `target`, adding
    /// `one_way` in each direction.
    pub async fn start(target: SocketAddr, one_way: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            // Dropped with the accept task: every connection ends with it.
            let mut connections = JoinSet::new();
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        connections.spawn(relay(client, target, one_way));
                    }
                    // Out of file descriptors, or a client gone before its
                    // accept: the next one may do, after a pause (a
                    // descriptor shortage would fail again at once).
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
                // Reap finished connections as we go.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(DelayProxy { address, accept })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, one_way: Duration) {
    let Ok(server) = TcpStream::connect(target).await else {
        // Refused: the client learns it a round trip later (as a close).
        tokio::time::sleep(2 * one_way).await;
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, one_way),
        pump(server_read, client_write, one_way),
    );
}

/// Copies `from` to `to`, each piece `delay` after it was read, and
/// closes `to` `delay` after `from` ended.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    // An empty piece is the close.
    let (pieces, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_IN_FLIGHT_PIECES);
    let reader = async move {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buffer).await.unwrap_or(0);
            let piece = (Instant::now() + delay, buffer[..n].to_vec());
            if pieces.send(piece).await.is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, piece)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if piece.is_empty() {
                break;
            }
            if to.write_all(&piece).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_intact_after_the_delay_each_way() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = echo.accept().await.unwrap();
            let mut buffer = [0u8; 5];
            socket.read_exact(&mut buffer).await.unwrap();
            socket.write_all(&buffer).await.unwrap();
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(50))
            .await
            .unwrap();
        let mut socket = TcpStream::connect(proxy.address).await.unwrap();
        let started = std::time::Instant::now();
        socket.write_all(b"hello").await.unwrap();
        let mut answer = [0u8; 5];
        socket.read_exact(&mut answer).await.unwrap();
        let round_trip = started.elapsed();
        assert_eq!(&answer, b"hello");
        assert!(round_trip >= Duration::from_millis(100), "{round_trip:?}");
        assert!(round_trip < Duration::from_millis(1000), "{round_trip:?}");
    }

    /// A close is delayed as data is: a server that closes at once is
    /// seen closing one delay later, and a target nobody listens on is
    /// seen a round trip later.
    #[tokio::test]
    async fn a_close_arrives_after_the_delay() {
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = closing.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = closing.accept().await.unwrap();
            drop(socket);
        });
        let delay = Duration::from_millis(300);
        let proxy = DelayProxy::start(target, delay).await.unwrap();
        let started = std::time::Instant::now();
        let mut socket = TcpStream::connect(proxy.address).await.unwrap();
        let mut buffer = [0u8; 1];
        assert_eq!(socket.read(&mut buffer).await.unwrap(), 0);
        let closed_after = started.elapsed();
        assert!(closed_after >= delay, "{closed_after:?}");

        let nobody = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = nobody.local_addr().unwrap();
        drop(nobody);
        let proxy = DelayProxy::start(target, delay).await.unwrap();
        let started = std::time::Instant::now();
        let mut socket = TcpStream::connect(proxy.address).await.unwrap();
        // (A reset or a close: either ends the read.)
        let _ = socket.read(&mut buffer).await;
        let refused_after = started.elapsed();
        assert!(refused_after >= 2 * delay, "{refused_after:?}");
    }
}
