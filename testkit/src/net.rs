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
        let (state, rx) = watch::channel(State::Open);
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime")
                .block_on(serve(listen, target, tls.map(Arc::new), rx));
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

async fn serve(
    listen: SocketAddr,
    target: SocketAddr,
    tls: Option<Arc<tokio_native_tls::TlsAcceptor>>,
    mut state: watch::Receiver<State>,
) {
    loop {
        let now = *state.borrow_and_update();
        match now {
            State::Stop => return,
            State::Cut => {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            State::Open => {}
        }
        let listener = loop {
            match TcpListener::bind(listen).await {
                Ok(l) => break l,
                // The port can stay busy for a moment after a cut.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
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
