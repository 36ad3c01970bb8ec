//! A cap on the TCP connections the learner holds open.
//!
//! tonic serves every connection it is handed. A client that opens
//! connections and never sends a call, or a fleet misconfigured to connect
//! in a loop, would hold file descriptors and HTTP/2 state without bound;
//! `learner.max_sessions` only counts actors that opened a session. Here
//! each accepted connection holds one of `learner.max_connections` permits
//! until it closes; one accepted beyond that is closed at once, before any
//! byte is read (its client sees UNAVAILABLE, and actors retry with
//! backoff), and counted under `too_many_connections`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::ingest::IngestStats;

/// An accepted connection and its place under the cap, given back when
/// tonic drops the connection.
#[derive(Debug)]
pub struct CountedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// The connections `listener` accepts, at most `max` open at once; those
/// beyond are closed and counted in `stats`.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    stats: Arc<IngestStats>,
) -> impl Stream<Item = io::Result<CountedConnection>> {
    let permits = Arc::new(Semaphore::new(max));
    TcpListenerStream::new(listener).filter_map(move |accepted| match accepted {
        // tonic logs and skips accept errors.
        Err(error) => Some(Err(error)),
        Ok(stream) => match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(CountedConnection {
                stream,
                _permit: permit,
            })),
            Err(_) => {
                stats.refuse("too_many_connections");
                warn!(
                    peer = ?stream.peer_addr().ok(),
                    max, "closed a connection beyond learner.max_connections"
                );
                None
            }
        },
    })
}

impl Connected for CountedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for CountedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
