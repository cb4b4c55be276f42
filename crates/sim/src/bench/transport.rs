//! How the raw MQTT client reaches a broker: plain TCP, TLS (rustls), WebSocket (binary frames,
//! subprotocol `mqtt`) or WebSocket over TLS, behind one stream type, [`MqttStream`].
//!
//! [`MqttStream`] is an enum rather than a boxed trait object so that the TCP path, which the
//! benchmarks measure, stays a direct call on a `TcpStream`, and [`MqttStream::into_split`] gives
//! TCP its own lock-free halves; only TLS and WebSocket go through `tokio::io::split`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// The WebSocket path Ferrohub serves MQTT at (`crates/adapters/src/mqtt/transport.rs`).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// How connections reach the broker. The default is plain TCP.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// MQTT over TCP.
    #[default]
    Tcp,
    /// MQTT over TLS.
    Tls(TlsClient),
    /// MQTT over WebSocket (`tls`: over TLS, `wss://`).
    Ws {
        /// `ws://host:port/path` or `wss://…`: the request line and `Host` of the handshake.
        url: String,
        /// TLS under the WebSocket.
        tls: Option<TlsClient>,
    },
}

impl Transport {
    /// `tcp`, `tls`, `ws` or `wss`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws { tls: None, .. } => "ws",
            Transport::Ws { tls: Some(_), .. } => "wss",
        }
    }
}

/// A TLS client configuration and the name the server's certificate must carry (also the SNI).
#[derive(Clone)]
pub struct TlsClient {
    /// Roots, verification and the client certificate shared by every connection.
    pub config: Arc<ClientConfig>,
    /// Server name (SNI and certificate check).
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A device's own TLS configuration (its client certificate), overriding the transport's.
#[derive(Clone)]
pub struct DeviceTls(pub Arc<ClientConfig>);

impl fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceTls(..)")
    }
}

impl PartialEq for DeviceTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A CA file holds no usable certificate.
    #[error("{0}: no usable CA certificate (expected PEM `BEGIN CERTIFICATE` blocks)")]
    Roots(String),
    /// The client certificate or key is unusable.
    #[error("client certificate: {0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// Not a DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Reads a PEM file (named in errors).
pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// What a client TLS configuration trusts and presents.
#[derive(Clone)]
pub struct TlsSettings {
    provider: Arc<CryptoProvider>,
    roots: Arc<rustls::RootCertStore>,
    insecure: bool,
}

impl TlsSettings {
    /// The public web roots plus the certificates of `ca_pem` (named `ca_name` in errors).
    /// `insecure` skips verifying the server's certificate altogether.
    pub fn new(ca_pem: Option<(&str, &[u8])>, insecure: bool) -> Result<Self, TlsConfigError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some((name, pem)) = ca_pem {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| TlsConfigError::Roots(format!("{name}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsConfigError::Roots(format!("{name}: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(TlsConfigError::Roots(name.to_string()));
            }
        }
        Ok(TlsSettings {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            roots: Arc::new(roots),
            insecure,
        })
    }

    /// A client configuration presenting `identity` (certificate chain PEM, private key PEM).
    pub fn config(
        &self,
        identity: Option<(&[u8], &[u8])>,
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(self.provider.clone())))
        } else {
            builder.with_root_certificates(self.roots.clone())
        };
        let config = match identity {
            Some((cert_pem, key_pem)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| TlsConfigError::Identity(e.to_string()))?;
                if chain.is_empty() {
                    return Err(TlsConfigError::Identity("no certificate in the PEM".into()));
                }
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| TlsConfigError::Identity(format!("private key: {e}")))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// Parses a server name (DNS name or IP address) for SNI and certificate checks.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsConfigError::ServerName(name.into()))
}

/// `--insecure`: accepts any server certificate (signatures of the handshake are still checked,
/// so the connection works; who is at the other end is not).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why the transport could not be set up (below MQTT).
#[derive(Debug, Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Broker address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// The TLS handshake failed (e.g. an untrusted certificate: see `--ca`, `--insecure`).
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        /// Broker address.
        addr: SocketAddr,
        /// The handshake error.
        source: io::Error,
    },
    /// The WebSocket handshake failed (e.g. a wrong `--ws-path`: HTTP 404).
    #[error("WebSocket handshake with {url}: {detail}")]
    WebSocket {
        /// The URL requested.
        url: String,
        /// What went wrong.
        detail: String,
    },
}

/// A TCP connection to `addr` from the local address `ip` (any free port).
async fn connect_from(ip: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0)).map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding to the source address {ip}: {e}"))
    })?;
    socket.connect(addr).await
}

/// Opens a connection to `addr` over `transport`, from the local address `from` if given;
/// `device_tls` replaces the transport's TLS configuration (a device's own client certificate).
pub async fn open(
    addr: SocketAddr,
    transport: &Transport,
    device_tls: Option<&DeviceTls>,
    from: Option<std::net::IpAddr>,
) -> Result<MqttStream, TransportError> {
    let tcp = match from {
        None => TcpStream::connect(addr).await,
        Some(ip) => connect_from(ip, addr).await,
    }
    .map_err(|source| TransportError::Connect { addr, source })?;
    // We batch writes ourselves; Nagle would only add latency.
    tcp.set_nodelay(true)
        .map_err(|source| TransportError::Connect { addr, source })?;
    let tls = |tcp: TcpStream, t: &TlsClient| {
        let config = device_tls.map_or_else(|| t.config.clone(), |d| d.0.clone());
        let name = t.server_name.clone();
        async move {
            TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| TransportError::Tls { addr, source })
        }
    };
    Ok(match transport {
        Transport::Tcp => MqttStream::Tcp(tcp),
        Transport::Tls(t) => MqttStream::Tls(Box::new(Flushed::new(tls(tcp, t).await?))),
        Transport::Ws { url, tls: None } => {
            MqttStream::Ws(Box::new(Flushed::new(ws_handshake(url, tcp).await?)))
        }
        Transport::Ws { url, tls: Some(t) } => {
            let s = tls(tcp, t).await?;
            MqttStream::Wss(Box::new(Flushed::new(ws_handshake(url, s).await?)))
        }
    })
}

async fn ws_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    url: &str,
    stream: S,
) -> Result<WsIo<S>, TransportError> {
    let fail = |detail: String| TransportError::WebSocket {
        url: url.to_string(),
        detail,
    };
    let mut req = url.into_client_request().map_err(|e| fail(e.to_string()))?;
    // MQTT over WebSocket asks for the `mqtt` subprotocol (MQTT 5.0 §6); tungstenite checks that
    // the server selected it.
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, None)
        .await
        .map_err(|e| {
            fail(match e {
                tungstenite::Error::Http(r) => format!("HTTP {}", r.status()),
                e => e.to_string(),
            })
        })?;
    Ok(WsIo {
        ws,
        pending: Bytes::new(),
    })
}

/// One client connection over any transport.
pub enum MqttStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS.
    Tls(Box<Flushed<TlsStream<TcpStream>>>),
    /// WebSocket.
    Ws(Box<Flushed<WsIo<TcpStream>>>),
    /// WebSocket over TLS.
    Wss(Box<Flushed<WsIo<TlsStream<TcpStream>>>>),
}

impl fmt::Debug for MqttStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MqttStream::Tcp(_) => "MqttStream::Tcp",
            MqttStream::Tls(_) => "MqttStream::Tls",
            MqttStream::Ws(_) => "MqttStream::Ws",
            MqttStream::Wss(_) => "MqttStream::Wss",
        })
    }
}

/// Calls `$method` on whichever stream `$self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            MqttStream::Tcp($s) => $e,
            MqttStream::Tls($s) => $e,
            MqttStream::Ws($s) => $e,
            MqttStream::Wss($s) => $e,
        }
    };
}

impl AsyncRead for MqttStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for MqttStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl MqttStream {
    /// Splits into a read and a write half: TCP's own halves, else `tokio::io::split`.
    pub fn into_split(self) -> (MqttRead, MqttWrite) {
        match self {
            MqttStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (MqttRead::Tcp(r), MqttWrite::Tcp(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (MqttRead::Other(r), MqttWrite::Other(w))
            }
        }
    }
}

/// The read half of an [`MqttStream`].
#[derive(Debug)]
pub enum MqttRead {
    /// TCP.
    Tcp(OwnedReadHalf),
    /// TLS or WebSocket.
    Other(tokio::io::ReadHalf<MqttStream>),
}

impl MqttRead {
    /// Reads what is available without waiting. Over TLS and WebSocket this always says
    /// `WouldBlock` (their bytes are only read by polling): callers fall back to awaiting a read.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            MqttRead::Tcp(r) => r.try_read_buf(buf),
            MqttRead::Other(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for MqttRead {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MqttRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            MqttRead::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// The write half of an [`MqttStream`].
#[derive(Debug)]
pub enum MqttWrite {
    /// TCP.
    Tcp(OwnedWriteHalf),
    /// TLS or WebSocket.
    Other(tokio::io::WriteHalf<MqttStream>),
}

impl AsyncWrite for MqttWrite {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MqttWrite::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            MqttWrite::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MqttWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            MqttWrite::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MqttWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            MqttWrite::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// Write-through over a buffering stream (TLS records, WebSocket frames): a write completes only
/// once its bytes are flushed to the socket. The client's callers `write_all` a buffer and then
/// wait for answers without calling `flush`, which is right for TCP; over a buffering layer the
/// tail of a write would otherwise wait for the next write.
///
/// A write that returns `Pending` after the bytes were taken reports them on the next call, so a
/// caller must retry with the same leading bytes (ours keep the buffer until the write is done).
pub struct Flushed<S> {
    inner: S,
    unflushed: usize,
}

impl<S> Flushed<S> {
    fn new(inner: S) -> Self {
        Flushed {
            inner,
            unflushed: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Flushed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Flushed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.unflushed == 0 {
            this.unflushed = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut this.unflushed)))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client WebSocket as a byte stream: each write is one binary frame; reads return the frames'
/// bytes in order, so an MQTT packet may span frames and a frame may hold several packets.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

fn ws_err(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(WsMessage::Binary(b))) => this.pending = b,
                // A close frame or the end of the stream: end of file.
                Some(Ok(WsMessage::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(WsMessage::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the broker sent a text frame (MQTT over WebSocket uses binary frames)",
                    )));
                }
                // Ping, pong: tungstenite answers pings itself.
                Some(Ok(_)) => {}
                // Reading after a close handshake: end of file, as a TCP socket would say.
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_err)?;
        Pin::new(&mut this.ws)
            .start_send(WsMessage::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_err)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    /// A WebSocket server end on `io` that selects the `mqtt` subprotocol when `select` is set.
    async fn accept(
        io: tokio::io::DuplexStream,
        select: bool,
    ) -> Result<WebSocketStream<tokio::io::DuplexStream>, tungstenite::Error> {
        #[allow(clippy::result_large_err)]
        let cb = move |_: &Request, mut resp: Response| {
            if select {
                resp.headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
            }
            Ok(resp)
        };
        tokio_tungstenite::accept_hdr_async(io, cb).await
    }

    #[tokio::test]
    async fn websocket_bytes_may_span_and_share_frames() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut ws = accept(b, true).await.unwrap();
            // One 10-byte "packet" over three frames, then two in one frame.
            for part in [&b"01234"[..], b"567", b"89", b"abcdefghij"] {
                ws.send(WsMessage::Binary(Bytes::copy_from_slice(part)))
                    .await
                    .unwrap();
            }
            // What the client writes arrives as one binary frame per write.
            let got = ws.next().await.unwrap().unwrap();
            ws.close(None).await.unwrap();
            got
        });
        let mut client = Flushed::new(ws_handshake("ws://localhost/mqtt", a).await.unwrap());
        let mut buf = Vec::new();
        while buf.len() < 20 {
            let mut chunk = [0u8; 64];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(&buf, b"0123456789abcdefghij");
        client.write_all(b"two packets!").await.unwrap();
        assert_eq!(
            server.await.unwrap(),
            WsMessage::Binary(Bytes::from_static(b"two packets!"))
        );
        // The close frame reads as the end of the stream.
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn websocket_server_must_select_mqtt() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { accept(b, false).await.map(|_| ()) });
        let e = ws_handshake("ws://localhost/mqtt", a).await.err().unwrap();
        assert!(e.to_string().contains("WebSocket handshake"), "{e}");
        let _ = server.await;
    }

    /// A buffering writer whose flush is not done at the first attempt (a full socket).
    #[derive(Default)]
    struct Buffering {
        buffered: Vec<u8>,
        flushed: Vec<u8>,
        flush_polls: usize,
    }

    impl AsyncWrite for Buffering {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(4);
            self.get_mut().buffered.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.flush_polls += 1;
            if this.flush_polls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let b = std::mem::take(&mut this.buffered);
            this.flushed.extend_from_slice(&b);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn writes_complete_only_once_flushed() {
        let mut w = Flushed::new(Buffering::default());
        w.write_all(b"0123456789").await.unwrap();
        // Everything written is out of the buffer, without a call to flush, and nothing twice.
        assert_eq!(w.inner.flushed, b"0123456789");
        assert!(w.inner.buffered.is_empty());
        assert_eq!(w.unflushed, 0);
    }

    #[test]
    fn tls_settings_check_their_inputs() {
        assert!(TlsSettings::new(None, false).is_ok());
        let e = TlsSettings::new(Some(("x.pem", b"not pem")), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("x.pem"), "{e}");
        let s = TlsSettings::new(None, true).unwrap();
        assert!(s.config(Some((b"", b""))).is_err());
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("not a name").is_err());
    }
}
