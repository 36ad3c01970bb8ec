//! A TCP proxy that holds every byte for a fixed time in each direction:
//! a long-haul network on loopback, for tests and benchmarks (this
//! machine's kernel has no netem).
//!
//! Each direction of each connection is a reader that timestamps what it
//! reads and a writer that forwards each piece once its delay has passed,
//! so latency is added without limiting bandwidth. At most
//! [`MAX_IN_FLIGHT_PIECES`] pieces wait per direction; beyond that the
//! reader stops reading, as a real link's buffers would.

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
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay(client, target, one_way));
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

/// Copies `from` to `to`, each piece `delay` after it was read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (pieces, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_IN_FLIGHT_PIECES);
    let reader = async move {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let piece = (Instant::now() + delay, buffer[..n].to_vec());
                    if pieces.send(piece).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping the sender tells the writer to finish and close.
    };
    let writer = async move {
        while let Some((at, piece)) = due.recv().await {
            tokio::time::sleep_until(at).await;
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
}
