//! Connections to the hub under test: the loopback target, one raw HTTP/1.1 keep-alive
//! connection (hyper's low-level client, so one `HttpConn` really is one TCP connection),
//! and WebSocket connections.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use super::BenchError;

/// The hub being measured: a loopback address, and the credential to present.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the Host header and URLs.
    pub authority: String,
    pub key: Option<String>,
}

impl Target {
    /// Parses `--server` and resolves it; anything but a loopback `http://` address is refused.
    pub async fn resolve(server: &str, key: Option<String>) -> Result<Self, BenchError> {
        let url = reqwest::Url::parse(server)
            .map_err(|e| BenchError::Usage(format!("--server {server:?} is not a URL: {e}")))?;
        if url.scheme() != "http" {
            return Err(BenchError::Usage(format!(
                "--server {server:?}: the load generator speaks plain http:// to a loopback hub only"
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| BenchError::Usage(format!("--server {server:?} has no host")))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let lookup = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup, port))
            .await
            .map_err(|e| BenchError::Usage(format!("cannot resolve {host}: {e}")))?
            .collect();
        let addr = addrs.iter().copied().find(|a| a.ip().is_loopback()).ok_or_else(|| {
            BenchError::Usage(format!(
                "--server {server:?} is not a loopback address; `tidings bench` only loads a hub on this machine (127.0.0.1)"
            ))
        })?;
        Ok(Self {
            addr,
            authority,
            key,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.authority)
    }

    /// A plain TCP connection to the target (TCP_NODELAY set).
    pub async fn tcp(&self) -> Result<TcpStream, BenchError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| BenchError::Connect(format!("{}: {e}", self.addr)))?;
        stream
            .set_nodelay(true)
            .map_err(|e| BenchError::Connect(format!("cannot set TCP_NODELAY: {e}")))?;
        Ok(stream)
    }

    fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Request<Full<Bytes>>, BenchError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &self.key {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        req.body(Full::new(body))
            .map_err(|e| BenchError::Usage(format!("cannot build a request for {path}: {e}")))
    }

    /// Opens a WebSocket to `/ws`.
    pub async fn websocket(&self) -> Result<WebSocketStream<TcpStream>, BenchError> {
        self.websocket_at("/ws").await
    }

    /// Opens a WebSocket to `path` (which may carry a query).
    pub async fn websocket_at(&self, path: &str) -> Result<WebSocketStream<TcpStream>, BenchError> {
        let tcp = self.tcp().await?;
        let mut req = format!("ws://{}{path}", self.authority)
            .into_client_request()
            .map_err(|e| BenchError::Connect(format!("bad WebSocket URL: {e}")))?;
        if let Some(key) = &self.key {
            let value = format!("Bearer {key}")
                .parse()
                .map_err(|_| BenchError::Usage("--key is not a valid header value".into()))?;
            req.headers_mut()
                .insert(hyper::header::AUTHORIZATION, value);
        }
        // tungstenite's default 128 KiB buffers per socket would cost GiBs at 19,000 sockets.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(config))
            .await
            .map_err(|e| BenchError::Connect(format!("WebSocket handshake: {e}")))?;
        Ok(ws)
    }
}

/// One HTTP/1.1 keep-alive connection; requests on it run one after another.
pub struct HttpConn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl HttpConn {
    pub async fn connect(target: &Target) -> Result<Self, BenchError> {
        let tcp = target.tcp().await?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| BenchError::Connect(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the peer closes; errors surface on requests.
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    /// False once the peer closed the connection.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Sends a request and returns the response with its body still to be read.
    pub async fn send(
        &mut self,
        target: &Target,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<Incoming>, BenchError> {
        let req = target.request(method, path, body)?;
        self.sender
            .ready()
            .await
            .map_err(|e| BenchError::Io(format!("connection lost: {e}")))?;
        self.sender
            .send_request(req)
            .await
            .map_err(|e| BenchError::Io(format!("request failed: {e}")))
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(
        &mut self,
        target: &Target,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), BenchError> {
        let resp = self.send(target, method, path, body).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Io(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
}
