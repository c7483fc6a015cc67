//! The S3 gateway: unmodified S3 clients (aws-cli, boto3, rclone) in front of archipel's object
//! pipeline.
//!
//! The gateway runs on the tenant's side. It holds the tenant's key, so it encrypts, erasure-codes
//! and places objects itself ([`archipel_objects`]); storage nodes only ever see ciphertext
//! shards. It speaks S3 with [`s3s`]: requests are checked (SigV4, header and query signatures,
//! streaming chunk signatures) against the access keys in [`keys`] before any operation runs.
//!
//! - [`s3`]: the S3 operations over a [`TenantClient`](archipel_objects::tenant::TenantClient).
//! - [`keys`]: access keys and what each may do; [`tokens`]: the capability tokens behind scoped
//!   keys. `POST /?archipel-register-key` with a token (base64) as body answers the token's S3
//!   credentials (JSON): the token is the authority, so the request needs no signature.
//! - [`multipart`]: multipart uploads.
//! - [`serve`]: the HTTP listener.
//! - [`client`]: a SigV4 client of other S3 endpoints (`archipel export --to s3://…`, the bench).

pub mod client;
pub mod keys;
pub mod multipart;
pub mod s3;
pub mod tokens;

use archipel_objects::tenant::TenantClient;
use archipel_types::PlacementPolicy;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a gateway needs.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The tenant's client: its key and the nodes it talks to.
    pub tenant: Arc<TenantClient>,
    /// The policy of buckets created through S3 (S3 has no words for a geofence, except a
    /// location constraint naming a region or area, which narrows it).
    pub default_policy: PlacementPolicy,
    /// Where multipart uploads keep their state, carries and parts that arrive out of order.
    pub spool: PathBuf,
    /// The access keys.
    pub keys: Arc<keys::Keys>,
}

/// Largest XML request body (a DeleteObjects of 1,000 keys of 1 KiB fits).
const MAX_XML_BODY: usize = 2 << 20;
/// Largest token a registration carries.
const MAX_TOKEN_BYTES: usize = 64 << 10;

/// Builds the S3 service of `config`, and starts reading the tenant's revocations from the
/// ledger every [`keys::REVOCATION_POLL`].
pub fn service(config: GatewayConfig) -> std::io::Result<s3s::service::S3Service> {
    let multipart = Arc::new(multipart::Uploads::open(&config.spool)?);
    let (uploads, tenant) = (multipart.clone(), config.tenant.clone());
    tokio::spawn(async move {
        // Holders keep a slow upload's streamed parts while something is written every 10 minutes.
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            uploads.keep_alive(&*tenant).await;
        }
    });
    let keys = config.keys.clone();
    let tenant = config.tenant.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = keys.refresh_revocations(&tenant).await {
                tracing::warn!("cannot read the tenant's revocations: {e}");
            }
            tokio::time::sleep(keys::REVOCATION_POLL).await;
        }
    });
    let s3 = s3::Archipel::new(config.tenant, config.default_policy, multipart);
    let mut builder = s3s::service::S3ServiceBuilder::new(s3);
    let mut limits = s3s::config::S3Config::default();
    limits.xml_max_body_size = MAX_XML_BODY;
    // Browser POST uploads are refused; their file part is not even read.
    limits.post_object_max_file_size = 0;
    limits.form_max_field_size = 16 << 10;
    limits.form_max_fields_size = 64 << 10;
    builder.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(limits))));
    builder.set_auth(keys::Auth(config.keys.clone()));
    builder.set_access(keys::Access(config.keys.clone()));
    builder.set_route(Register(config.keys));
    Ok(builder.build())
}

/// `POST /?archipel-register-key`: a token in, its S3 credentials out.
#[derive(Debug)]
struct Register(Arc<keys::Keys>);

#[async_trait::async_trait]
impl s3s::route::S3Route for Register {
    fn is_match(
        &self,
        method: &hyper::Method,
        uri: &hyper::Uri,
        _: &hyper::HeaderMap,
        _: &mut hyper::http::Extensions,
    ) -> bool {
        method == hyper::Method::POST && uri.path() == "/" && uri.query() == Some("archipel-register-key")
    }

    async fn check_access(&self, _: &mut s3s::S3Request<s3s::Body>) -> s3s::S3Result<()> {
        // The token in the body is the authority: it is checked in `call`.
        Ok(())
    }

    async fn call(&self, req: s3s::S3Request<s3s::Body>) -> s3s::S3Result<s3s::S3Response<s3s::Body>> {
        let mut body = req.input;
        let bytes = body
            .store_all_limited(MAX_TOKEN_BYTES)
            .await
            .map_err(|e| s3s::s3_error!(InvalidRequest, "send the token (base64) as the body, at most 64 KiB: {e}"))?;
        let token = std::str::from_utf8(&bytes).map_err(|_| s3s::s3_error!(InvalidRequest, "the token is not text"))?;
        let key = self.0.register(token).map_err(|e| s3s::S3Error::with_message(s3s::S3ErrorCode::AccessDenied, e))?;
        let json = serde_json::json!({"access_key_id": key.access_key, "secret_access_key": key.secret});
        let mut resp = s3s::S3Response::new(s3s::Body::from(json.to_string()));
        resp.headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        Ok(resp)
    }
}

/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 512;
/// Largest request head (request line and headers); a larger one is answered 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves S3 on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: s3s::service::S3Service,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that does not finish its headers in time is dropped (slow-header attacks).
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait and go on rather than stop serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let _ = socket.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("{MAX_CONNECTIONS} connections open: refusing another");
            continue;
        };
        let s3 = service.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let s3 = s3.clone();
            async move {
                let declared = declares_body(req.headers());
                let read = Arc::new(AtomicBool::new(false));
                let req = req.map(|body| s3s::Body::http_body(ReadToEnd { inner: body, read: read.clone() }));
                let response = s3.call(req).await?;
                let unread = declared && !read.load(Ordering::Acquire);
                Ok::<_, s3s::HttpError>(close_if_body_unread(unread, response))
            }
        });
        let http = http.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = http.serve_connection(TokioIo::new(socket), service).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Whether a request announces a body (a length above zero, a chunked transfer, or
/// `Expect: 100-continue`).
fn declares_body(headers: &hyper::HeaderMap) -> bool {
    use hyper::header::{CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
    let length = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).map(str::trim);
    headers.contains_key(TRANSFER_ENCODING) || headers.contains_key(EXPECT) || length.is_some_and(|l| l != "0")
}

/// A request body that notes when it was read to its end.
struct ReadToEnd<B> {
    inner: B,
    read: Arc<AtomicBool>,
}

impl<B: http_body::Body + Unpin> http_body::Body for ReadToEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.read.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer sent before the request's body was read to its end closes the connection after it.
///
/// A refusal is sent without reading the body, and so may a success (an `Expect: 100-continue`
/// on a request that needs no body). A client that got the answer instead of `100 Continue` does
/// not send the body (botocore, curl), yet hyper 1.12 (pinned) then drains up to the announced
/// length from the connection, which may be the first bytes of the client's next request:
/// botocore's `DELETE` after a refused `PUT` arrived as `ELETE` and failed its signature, under
/// load, one time in a few hundred. Closing is what RFC 9110 §10.1.1 leaves a server that cannot
/// tell a body from the next request.
fn close_if_body_unread<B>(unread: bool, mut response: hyper::Response<B>) -> hyper::Response<B> {
    if unread {
        response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (hyper::header::HeaderName::from_static(k), hyper::header::HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_request_declares_a_body_by_length_chunking_or_expectation() {
        assert!(declares_body(&headers(&[("content-length", "1")])));
        assert!(declares_body(&headers(&[("transfer-encoding", "chunked")])));
        assert!(declares_body(&headers(&[("expect", "100-continue"), ("content-length", "0")])));
        assert!(!declares_body(&headers(&[("content-length", "0")])));
        assert!(!declares_body(&headers(&[])));
    }

    #[test]
    fn an_answer_before_the_body_was_read_closes_its_connection() {
        let answer = |unread: bool| {
            let response = hyper::Response::builder().status(200).body(()).unwrap();
            close_if_body_unread(unread, response).headers().get("connection").map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(answer(true).as_deref(), Some("close"));
        assert_eq!(answer(false), None);
    }

    #[test]
    fn a_body_is_read_only_once_its_end_was_reached() {
        use http_body::Body as _;
        let read = Arc::new(AtomicBool::new(false));
        let mut body = ReadToEnd { inner: s3s::Body::from(b"abc".to_vec()), read: read.clone() };
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(!read.load(Ordering::Acquire), "nothing read yet");
        let frame = std::pin::Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(frame, std::task::Poll::Ready(Some(Ok(_)))));
        let end = loop {
            match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
                std::task::Poll::Ready(None) => break true,
                std::task::Poll::Ready(Some(Ok(_))) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(end && read.load(Ordering::Acquire), "read to its end");
        // An empty body is read once it says it ended.
        let read = Arc::new(AtomicBool::new(false));
        let empty = ReadToEnd { inner: s3s::Body::empty(), read: read.clone() };
        let _ = empty.is_end_stream();
        assert!(read.load(Ordering::Acquire));
    }
}
