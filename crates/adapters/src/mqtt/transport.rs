//! Listeners: plain TCP, TLS (rustls, optional client certificates) and WebSocket (`/mqtt`,
//! subprotocol `mqtt`). Each accept loop takes an already-bound listener and stops on shutdown.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::broker::Broker;
use super::connection::{ConnInfo, serve};

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate chain PEM holds no certificate or cannot be parsed.
    #[error("no usable certificate in the certificate file: {0}")]
    Certificate(String),
    /// The private key PEM cannot be parsed.
    #[error("no usable private key in the key file: {0}")]
    Key(String),
    /// The client CA bundle cannot be used.
    #[error("client CA bundle unusable: {0}")]
    ClientCa(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor whose client certificates are checked by `verifier` (the registry's trust
/// store of tenant CAs, which changes at runtime).
pub fn tls_acceptor_with_verifier(
    cert_pem: &[u8],
    key_pem: &[u8],
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let (certs, key) = load_server_identity(cert_pem, key_pem)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_server_identity(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerIdentity, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Certificate("empty".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsSetupError::Key(e.to_string()))?;
    Ok((certs, key))
}

/// Builds a TLS acceptor from PEM data. With `client_ca_pem`, client certificates signed by those
/// CAs are verified (mTLS); `require_client_cert` makes them mandatory.
pub fn tls_acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
    require_client_cert: bool,
) -> Result<TlsAcceptor, TlsSetupError> {
    let (certs, key) = load_server_identity(cert_pem, key_pem)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match client_ca_pem {
        Some(ca_pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_pem) {
                let cert = cert.map_err(|e| TlsSetupError::ClientCa(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsSetupError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsSetupError::ClientCa(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Which transport a listener speaks.
#[derive(Clone)]
pub enum Transport {
    /// MQTT over plain TCP.
    Tcp,
    /// MQTT over TLS.
    Tls(TlsAcceptor),
    /// MQTT over WebSocket (path `/mqtt`).
    WebSocket,
}

/// Accepts connections on `listener` until shutdown, serving each in its own task.
pub async fn run_listener(broker: Arc<Broker>, listener: TcpListener, transport: Transport) {
    let mut shutdown = broker.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let mut info = ConnInfo {
            peer,
            certificates: None,
            protocol: match transport {
                Transport::Tcp => "mqtt",
                Transport::Tls(_) => "mqtts",
                Transport::WebSocket => "ws",
            },
        };
        // One spawn per transport, so that each task is only as large as its own state (an idle
        // TCP connection must not carry room for TLS or WebSocket state).
        match &transport {
            Transport::Tcp => {
                let (r, w) = stream.into_split();
                tokio::spawn(serve(broker, r, w, info));
            }
            Transport::Tls(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let deadline = Duration::from_secs(broker.config.connect_timeout_secs);
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            info.certificates = tls.get_ref().1.peer_certificates().map(|chain| {
                                chain
                                    .iter()
                                    .map(|c| c.as_ref().to_vec())
                                    .collect::<Box<[_]>>()
                            });
                            let (r, w) = tokio::io::split(tls);
                            Box::pin(serve(broker, r, w, info)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Transport::WebSocket => {
                tokio::spawn(async move {
                    let deadline = Duration::from_secs(broker.config.connect_timeout_secs);
                    // A frame may carry several MQTT packets, and an oversized packet should reach
                    // the MQTT decoder (which answers DISCONNECT 0x95) rather than die in the
                    // WebSocket layer: allow twice the packet limit plus slack per message.
                    let max =
                        (broker.config.max_packet_size as usize).saturating_mul(2) + 64 * 1024;
                    match tokio::time::timeout(deadline, accept_ws(stream, max)).await {
                        Ok(Ok(ws)) => {
                            let (r, w) = tokio::io::split(WsIo::new(ws));
                            Box::pin(serve(broker, r, w, info)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "WebSocket handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "WebSocket handshake timed out"),
                    }
                });
            }
        }
    }
}

async fn accept_ws(
    stream: TcpStream,
    max_message: usize,
) -> Result<WebSocketStream<TcpStream>, tungstenite::Error> {
    // The error type is tungstenite's, so its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/mqtt" {
            let mut err = ErrorResponse::new(Some("MQTT over WebSocket is served at /mqtt".into()));
            *err.status_mut() = StatusCode::NOT_FOUND;
            return Err(err);
        }
        let offers_mqtt = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "mqtt");
        if offers_mqtt {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
}

/// A WebSocket as a byte stream: MQTT packets may span or share binary frames.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

impl<S> WsIo<S> {
    /// Wraps an accepted WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsIo {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn ws_err(e: tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(WsMessage::Binary(b))) => self.pending = b,
                Some(Ok(WsMessage::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(WsMessage::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary frames",
                    )));
                }
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
        Pin::new(&mut self.ws)
            .start_send(WsMessage::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_err)?;
        // Push the frame out now; a later flush completes it if the socket is full.
        let _ = Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_err)
    }
}
