//! Network paths for outage and TLS tests: a TCP proxy the test can cut and restore (or that
//! terminates TLS in front of a plain server), and a private Kafka-protocol broker that
//! advertises such a proxy as its address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq)]
enum State {
    Open,
    Cut,
    Stop,
}

/// A TCP proxy on its own thread and runtime (so that blocking test code never stalls it).
/// [`TcpProxy::cut`] closes the listening socket and resets every connection, as a broken
/// network path would; [`TcpProxy::restore`] listens again.
pub struct TcpProxy {
    state: watch::Sender<State>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Forwards connections on `listen` to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> Self {
        Self::spawn(listen, target, None)
    }

    /// Accepts TLS on `listen` with the certificate and PKCS#8 key (PEM files) given, and
    /// forwards the plain bytes to `target`.
    pub fn start_tls(
        listen: SocketAddr,
        target: SocketAddr,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Self {
        let read = |p: &std::path::Path| {
            std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        };
        let identity =
            native_tls::Identity::from_pkcs8(&read(cert), &read(key)).expect("certificate and key");
        let acceptor = native_tls::TlsAcceptor::new(identity).expect("TLS acceptor");
        Self::spawn(listen, target, Some(acceptor.into()))
    }

    fn spawn(
        listen: SocketAddr,
        target: SocketAddr,
        tls: Option<tokio_native_tls::TlsAcceptor>,
    ) -> Self {
        // Bound here, so that a port someone else holds fails the test at once, by name.
        let first = bind_within(listen, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("proxy cannot listen on {listen}: {e}"));
        let (state, rx) = watch::channel(State::Open);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            let first = runtime
                .block_on(async { TcpListener::from_std(first) })
                .expect("proxy listener");
            runtime.block_on(serve(first, listen, target, tls.map(Arc::new), rx));
        });
        Self {
            state,
            thread: Some(thread),
        }
    }

    /// Closes the path: no connection is accepted, every open one is reset.
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Opens the path again.
    pub fn restore(&self) {
        self.state.send_replace(State::Open);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.send_replace(State::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first port of the kernel's ephemeral range (Linux; 32768 where unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback address on a free port outside the kernel's ephemeral range, for a server a
/// test starts later. A port from that range (what binding port 0 gives) is the pool every
/// process's port-0 binds and outgoing connections draw from, so it can be taken before the
/// test listens on it.
pub fn free_addr() -> SocketAddr {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Ports handed out by this process: never twice, though the first is not listening yet.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    static SEED: AtomicU64 = AtomicU64::new(0);
    let low = ephemeral_low();
    let (from, span) = if low > 12000 {
        (10000u16, low - 10000)
    } else {
        (61000u16, 4000)
    };
    let mut x = SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        ^ u64::from(std::process::id()).wrapping_mul(0x2545_f491_4f6c_dd1d)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = from + (x % u64::from(span)) as u16;
        if given.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            given.push(port);
            return addr;
        }
    }
    panic!(
        "no free port in {from}..{}",
        u32::from(from) + u32::from(span)
    );
}

/// Binds `addr`, retrying while it is busy (a port just released can be for a moment).
fn bind_within(addr: SocketAddr, limit: Duration) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true)?;
                return Ok(l);
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

async fn serve(
    first: TcpListener,
    listen: SocketAddr,
    target: SocketAddr,
    tls: Option<Arc<tokio_native_tls::TlsAcceptor>>,
    mut state: watch::Receiver<State>,
) {
    let mut first = Some(first);
    loop {
        let now = *state.borrow_and_update();
        match now {
            State::Stop => return,
            State::Cut => {
                first = None;
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            State::Open => {}
        }
        let listener = match first.take() {
            Some(l) => l,
            None => loop {
                match TcpListener::bind(listen).await {
                    Ok(l) => break l,
                    // The port can stay busy for a moment after a cut; a stop ends the wait
                    // (a proxy dropped must never hang its test).
                    Err(_) => tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = state.wait_for(|s| *s == State::Stop) => return,
                    },
                }
            },
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(forward(client, target, tls.clone(), state.clone()));
                    }
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *state.borrow() != State::Open {
                        break; // drops the listener
                    }
                }
            }
        }
    }
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    tls: Option<Arc<tokio_native_tls::TlsAcceptor>>,
    state: watch::Receiver<State>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    match tls {
        None => copy_until_cut(client, &mut server, state).await,
        Some(acceptor) => {
            if let Ok(client) = acceptor.accept(client).await {
                copy_until_cut(client, &mut server, state).await;
            }
        }
    }
}

async fn copy_until_cut<S>(mut client: S, server: &mut TcpStream, mut state: watch::Receiver<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, server) => {}
        _ = state.wait_for(|s| *s != State::Open) => {
            // Reset rather than close, as a broken path looks to the server.
            let _ = server.set_zero_linger();
        }
    }
}

/// A private Tansu broker (memory storage) listening on `listen` and advertising `advertised`
/// to clients; killed when dropped. The binary is the one `scripts/services.sh` installed.
pub struct PrivateBroker {
    child: Child,
}

impl PrivateBroker {
    /// Starts the broker and waits until it accepts connections.
    pub fn start(listen: SocketAddr, advertised: SocketAddr) -> Self {
        let services = std::env::var("SLUICE_SERVICES_DIR").map_or_else(
            |_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.services")),
            PathBuf::from,
        );
        let tansu = services.join("bin/tansu");
        let child = Command::new(&tansu)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://{listen}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} (run scripts/services.sh up): {e}",
                    tansu.display()
                )
            });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private broker listens"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addresses_are_distinct_bindable_and_never_ephemeral() {
        let low = ephemeral_low();
        let addrs: Vec<SocketAddr> = (0..50).map(|_| free_addr()).collect();
        for a in &addrs {
            assert!(a.ip().is_loopback());
            assert!(
                a.port() < low || low <= 12000,
                "{a} is in the ephemeral range"
            );
            std::net::TcpListener::bind(a).expect("bindable");
        }
        let mut ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), addrs.len(), "no port given twice");
    }

    #[test]
    fn a_dropped_proxy_whose_port_is_taken_again_stops() {
        let listen = free_addr();
        let proxy = TcpProxy::start(listen, free_addr());
        proxy.cut();
        std::thread::sleep(Duration::from_millis(200));
        // Someone else takes the port while the path is cut: the proxy cannot listen again.
        let _taker = std::net::TcpListener::bind(listen).expect("the cut released the port");
        proxy.restore();
        std::thread::sleep(Duration::from_millis(200));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(proxy);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the proxy stops though it is waiting for its port");
    }
}
