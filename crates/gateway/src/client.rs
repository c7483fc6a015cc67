//! A small SigV4 S3 client for *another* S3 endpoint — AWS, MinIO, Ceph, another archipel
//! gateway. `archipel export --to s3://bucket/prefix` writes through it and `cargo xtask bench s3`
//! drives both servers with it.
//!
//! - **Addressing**: path style (`https://host/bucket/key`), which every S3 server answers for a
//!   configured endpoint. A key with a `.` or `..` segment cannot be carried in such a URL (the URL
//!   is normalised on the way) and is refused by name.
//! - **Signing**: AWS Signature Version 4 over every header sent, the payload's SHA-256 signed
//!   ([`PayloadHash::Signed`], the default) or `UNSIGNED-PAYLOAD`.
//! - **Credentials**: given, or the standard `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_REGION` / `AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables.
//! - **Errors**: an S3 error answer becomes [`ClientError::S3`] with its status, `Code` and
//!   `Message`.

use bytes::Bytes;
use ring::{digest, hmac};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a request to another S3 endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint or the credentials are not usable.
    #[error("{0}")]
    Config(String),
    /// The request did not reach the endpoint or its answer did not arrive.
    #[error("{what}: {source}")]
    Http {
        /// The operation.
        what: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The endpoint answered with an S3 error.
    #[error("{what}: {status} {code}: {message}")]
    S3 {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The S3 error code (`NoSuchBucket`, `AccessDenied`…), or the status text.
        code: String,
        /// The error's message.
        message: String,
    },
}

impl ClientError {
    /// The S3 error code of an error answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::S3 { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Largest XML answer read (a listing of 1,000 keys of 1 KiB fits).
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// How the payload is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadHash {
    /// Its SHA-256, part of the signature, and its MD5 sent as `Content-MD5` (the server
    /// refuses a body that changed on the way).
    Signed,
    /// `UNSIGNED-PAYLOAD`, no `Content-MD5`: the body is not covered by the signature.
    Unsigned,
}

/// An object's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes.
    pub size: u64,
    /// The ETag, unquoted.
    pub etag: String,
    /// User metadata (`x-amz-meta-NAME`), by lowercase name.
    pub user: BTreeMap<String, String>,
    /// The representation headers kept with the object (`content-type`, `content-encoding`,
    /// `content-disposition`, `content-language`, `cache-control`), by lowercase name.
    pub content: BTreeMap<String, String>,
}

/// The representation headers an object keeps.
pub const CONTENT_HEADERS: [&str; 5] =
    ["content-type", "content-encoding", "content-disposition", "content-language", "cache-control"];

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Keys and sizes, in order.
    pub objects: Vec<(String, u64)>,
    /// The token of the next page, when there is one.
    pub next: Option<String>,
}

/// A SigV4-signing client of one S3 endpoint.
#[derive(Clone)]
pub struct S3Client {
    http: reqwest::Client,
    endpoint: String,
    host: String,
    region: String,
    access: String,
    secret: String,
    payload: PayloadHash,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("S3Client").field("endpoint", &self.endpoint).field("access", &self.access).finish()
    }
}

/// `YYYYMMDD'T'HHMMSS'Z'` and `YYYYMMDD` of a Unix time.
pub fn amz_dates(secs: u64) -> (String, String) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    (format!("{date}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60), date)
}

fn hmac256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg).as_ref().to_vec()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

/// A header value as SigV4 signs it and as it is sent: trimmed, runs of spaces made one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SigV4 URI encoding: every byte but `A-Za-z0-9-._~` (and `/` when `keep_slash`) as `%XX`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes XML's five entities and numeric character references.
fn xml_unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';')? + i;
        let entity = &rest[i + 1..end];
        match entity {
            "amp" => out.push('&'),
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            _ => {
                let code = match entity.strip_prefix("#x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                out.push(char::from_u32(code)?);
            }
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Undoes URL encoding (`encoding-type=url` listings): `%XX` and `+`.
fn url_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// A ListObjectsV2 answer (`encoding-type=url`): its keys and sizes and the next token.
fn parse_list(xml: &str) -> Option<ListPage> {
    let mut page = ListPage::default();
    let mut rest = xml;
    // Keys are URL-encoded only when the server says so (one that ignores `encoding-type`
    // sends them as they are).
    let encoded = xml_field(xml, "EncodingType").is_some_and(|e| e.trim() == "url");
    while let Some(i) = rest.find("<Contents>") {
        let end = rest[i..].find("</Contents>")? + i;
        let entry = &rest[i..end];
        let key = xml_unescape(xml_field(entry, "Key")?)?;
        let key = if encoded { url_decode(&key)? } else { key };
        let size = xml_field(entry, "Size")?.trim().parse().ok()?;
        page.objects.push((key, size));
        rest = &rest[end..];
    }
    if xml_field(xml, "IsTruncated").map(str::trim) == Some("true") {
        page.next = Some(xml_unescape(xml_field(xml, "NextContinuationToken")?)?);
    }
    Some(page)
}

/// The text between `<tag>` and `</tag>` in an XML answer.
fn xml_field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..start + end])
}

impl S3Client {
    /// A client of `endpoint` (`http(s)://host[:port]`) in `region` with these credentials.
    pub fn new(endpoint: &str, region: &str, access: &str, secret: &str) -> Result<S3Client, ClientError> {
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| ClientError::Config(format!("the S3 endpoint {endpoint:?} is not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.path() != "/" || url.query().is_some() {
            return Err(ClientError::Config(format!(
                "the S3 endpoint {endpoint:?} must be http(s)://host[:port], with no path"
            )));
        }
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(ClientError::Config(format!("the S3 endpoint {endpoint:?} names no host"))),
        };
        if access.is_empty() || secret.is_empty() {
            return Err(ClientError::Config("an S3 access key and secret are needed".into()));
        }
        let mut http = reqwest::Client::builder().pool_max_idle_per_host(64).connect_timeout(Duration::from_secs(10));
        // The `*_PROXY` variables are honoured, as other S3 clients do, except for a loopback
        // endpoint (a proxy would not reach it).
        let bare = url.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
        let loopback = bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            http = http.no_proxy();
        }
        let http = http.build().map_err(|e| ClientError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(S3Client {
            http,
            endpoint: format!("{}://{host}", url.scheme()),
            host,
            region: region.into(),
            access: access.into(),
            secret: secret.into(),
            payload: PayloadHash::Signed,
        })
    }

    /// A client from the standard AWS variables; `endpoint` overrides `AWS_ENDPOINT_URL(_S3)`.
    pub fn from_env(endpoint: Option<&str>) -> Result<S3Client, ClientError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint =
            endpoint.map(str::to_string).or_else(|| var("AWS_ENDPOINT_URL_S3")).or_else(|| var("AWS_ENDPOINT_URL"));
        let endpoint = endpoint
            .ok_or_else(|| ClientError::Config("no S3 endpoint: pass --endpoint-url or set AWS_ENDPOINT_URL".into()))?;
        let access = var("AWS_ACCESS_KEY_ID").ok_or_else(|| {
            ClientError::Config("AWS_ACCESS_KEY_ID is not set: the target's access key is needed".into())
        })?;
        let secret = var("AWS_SECRET_ACCESS_KEY").ok_or_else(|| {
            ClientError::Config("AWS_SECRET_ACCESS_KEY is not set: the target's secret key is needed".into())
        })?;
        let region = var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into());
        S3Client::new(&endpoint, &region, &access, &secret)
    }

    /// The same client, signing payloads as `payload` says.
    pub fn with_payload(mut self, payload: PayloadHash) -> S3Client {
        self.payload = payload;
        self
    }

    /// The endpoint, `scheme://host[:port]`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The path of `bucket` and `key`, URI-encoded; refuses keys a URL cannot carry.
    fn path(bucket: &str, key: Option<&str>) -> Result<String, ClientError> {
        let mut path = format!("/{}", uri_encode(bucket, false));
        if let Some(key) = key {
            if key.split('/').any(|seg| seg == "." || seg == "..") {
                return Err(ClientError::Config(format!(
                    "the key {key:?} has a `.` or `..` segment, which a path-style S3 URL cannot carry"
                )));
            }
            path.push('/');
            path.push_str(&uri_encode(key, true));
        }
        Ok(path)
    }

    /// A signed request. `query` pairs are sent as given (a key with an empty value as `key=`);
    /// every header in `headers` is signed.
    fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        body: &[u8],
    ) -> reqwest::RequestBuilder {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.signed_at(now, method, path, query, headers, body)
    }

    /// [`Self::signed`] at Unix time `now`.
    fn signed_at(
        &self,
        now: u64,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        body: &[u8],
    ) -> reqwest::RequestBuilder {
        let (stamp, _) = amz_dates(now);
        let payload = match self.payload {
            PayloadHash::Signed => sha256_hex(body),
            PayloadHash::Unsigned => "UNSIGNED-PAYLOAD".into(),
        };
        let mut pairs: Vec<(String, String)> =
            query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
        pairs.sort();
        let query_text = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let mut signed: BTreeMap<String, String> =
            headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v))).collect();
        if self.payload == PayloadHash::Signed && !body.is_empty() {
            use base64::Engine as _;
            use md5::Digest as _;
            let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body));
            signed.insert("content-md5".into(), md5);
        }
        signed.insert("host".into(), self.host.clone());
        signed.insert("x-amz-content-sha256".into(), payload.clone());
        signed.insert("x-amz-date".into(), stamp);
        let authorization = self.authorization(now, method.as_str(), path, &query_text, &signed, &payload);
        let url = if query_text.is_empty() {
            format!("{}{path}", self.endpoint)
        } else {
            format!("{}{path}?{query_text}", self.endpoint)
        };
        let mut req = self.http.request(method, url);
        for (k, v) in &signed {
            if k != "host" {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        req.header("authorization", authorization)
    }

    /// The `Authorization` header of a request at `secs`: `headers` are all the signed ones
    /// (lowercase names, trimmed values), `query` is canonical already.
    fn authorization(
        &self,
        secs: u64,
        method: &str,
        path: &str,
        query: &str,
        headers: &BTreeMap<String, String>,
        payload: &str,
    ) -> String {
        let (stamp, date) = amz_dates(secs);
        let names = headers.keys().cloned().collect::<Vec<_>>().join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let canonical = format!("{method}\n{path}\n{query}\n{canonical_headers}\n{names}\n{payload}");
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
        let mut key = hmac256(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac256(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac256(&key, to_sign.as_bytes()));
        format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}", self.access)
    }

    /// Sends `req`; an error answer becomes [`ClientError::S3`].
    async fn send(req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Http { what: what.into(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = Self::text(resp, what).await.unwrap_or_default();
        let code = xml_field(&body, "Code")
            .map(str::to_string)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").replace(' ', ""));
        let message = xml_field(&body, "Message").unwrap_or("").to_string();
        Err(ClientError::S3 { what: what.into(), status: status.as_u16(), code, message })
    }

    /// An answer's body as text, at most [`MAX_ANSWER_BYTES`] (an endpoint cannot make the
    /// client hold more).
    async fn text(mut resp: reqwest::Response, what: &str) -> Result<String, ClientError> {
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|source| ClientError::Http { what: what.into(), source })? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::S3 {
                    what: what.into(),
                    status: 200,
                    code: "AnswerTooLarge".into(),
                    message: format!("the answer passed {MAX_ANSWER_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn etag_of(resp: &reqwest::Response) -> String {
        resp.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or("").trim_matches('"').to_string()
    }

    /// Creates `bucket`; one this key already owns is not an error.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        let req = self.signed(reqwest::Method::PUT, &Self::path(bucket, None)?, &[], &[], b"");
        match Self::send(req, &format!("create bucket {bucket}")).await {
            Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            r => r.map(drop),
        }
    }

    /// Whether `bucket` exists and this key may use it: a one-key listing (a `HEAD` answer has
    /// no body, so no S3 error code to name what is wrong).
    pub async fn check_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        let query = [("list-type", "2"), ("max-keys", "1")];
        let req = self.signed(reqwest::Method::GET, &Self::path(bucket, None)?, &query, &[], b"");
        Self::send(req, &format!("bucket {bucket}")).await.map(drop)
    }

    /// The head of `bucket/key`, `None` when there is no such object.
    pub async fn head_object(&self, bucket: &str, key: &str) -> Result<Option<Head>, ClientError> {
        let req = self.signed(reqwest::Method::HEAD, &Self::path(bucket, Some(key))?, &[], &[], b"");
        let resp = match Self::send(req, &format!("HEAD {bucket}/{key}")).await {
            Err(ClientError::S3 { status: 404, .. }) => return Ok(None),
            r => r?,
        };
        let size = resp.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        let user = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                Some((k.as_str().strip_prefix("x-amz-meta-")?.to_string(), v.to_str().ok()?.to_string()))
            })
            .collect();
        let content = CONTENT_HEADERS
            .iter()
            .filter_map(|name| Some((name.to_string(), resp.headers().get(*name)?.to_str().ok()?.to_string())))
            .collect();
        Ok(Some(Head { size, etag: Self::etag_of(&resp), user, content }))
    }

    /// PUTs `body` at `bucket/key` with `headers`; returns the ETag.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<String, ClientError> {
        let req = self
            .signed(reqwest::Method::PUT, &Self::path(bucket, Some(key))?, &[], headers, &body)
            .timeout(Duration::from_secs(600))
            .body(body);
        Ok(Self::etag_of(&Self::send(req, &format!("PUT {bucket}/{key}")).await?))
    }

    /// GETs `bucket/key`: the answer, its body still to read.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<reqwest::Response, ClientError> {
        let req = self.signed(reqwest::Method::GET, &Self::path(bucket, Some(key))?, &[], &[], b"");
        Self::send(req.timeout(Duration::from_secs(600)), &format!("GET {bucket}/{key}")).await
    }

    /// One page (up to 1,000 keys) of the keys under `prefix` in `bucket`, from `token` (the `next`
    /// of the page before).
    pub async fn list_page(&self, bucket: &str, prefix: &str, token: Option<&str>) -> Result<ListPage, ClientError> {
        let mut query = vec![("list-type", "2"), ("prefix", prefix), ("encoding-type", "url")];
        if let Some(t) = token {
            query.push(("continuation-token", t));
        }
        let what = format!("list {bucket}/{prefix}");
        let req = self.signed(reqwest::Method::GET, &Self::path(bucket, None)?, &query, &[], b"");
        let text = Self::text(Self::send(req, &what).await?, &what).await?;
        parse_list(&text).ok_or_else(|| ClientError::S3 {
            what,
            status: 200,
            code: "MalformedXML".into(),
            message: "the listing cannot be read".into(),
        })
    }

    /// GETs `bucket/key` as a reader of its body; a failure mid-body is an error of the read.
    ///
    /// With `expect` (the ETag and size a HEAD gave), the GET carries `If-Match` and an answer of
    /// another length is refused: an object replaced between the two is not read as the other.
    pub async fn get_reader(
        &self,
        bucket: &str,
        key: &str,
        expect: Option<(&str, u64)>,
    ) -> Result<impl tokio::io::AsyncRead + Send + Unpin + 'static, ClientError> {
        let what = format!("GET {bucket}/{key}");
        let headers: Vec<(String, String)> =
            expect.map(|(etag, _)| ("if-match".to_string(), format!("\"{etag}\""))).into_iter().collect();
        let req = self.signed(reqwest::Method::GET, &Self::path(bucket, Some(key))?, &[], &headers, b"");
        let resp = Self::send(req.timeout(Duration::from_secs(600)), &what).await?;
        if let Some((_, size)) = expect
            && resp.content_length() != Some(size)
        {
            return Err(ClientError::S3 {
                what,
                status: resp.status().as_u16(),
                code: "SizeChanged".into(),
                message: format!("the answer has {:?} bytes, the listing said {size}", resp.content_length()),
            });
        }
        let chunks = futures::stream::unfold(Some(resp), |resp| async move {
            let mut resp = resp?;
            match resp.chunk().await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(resp))),
                Ok(None) => None,
                // The error ends the stream: nothing is read after it.
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        });
        Ok(tokio_util::io::StreamReader::new(Box::pin(chunks)))
    }

    /// Deletes `bucket/key` (no error when there is none).
    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), ClientError> {
        let req = self.signed(reqwest::Method::DELETE, &Self::path(bucket, Some(key))?, &[], &[], b"");
        Self::send(req, &format!("DELETE {bucket}/{key}")).await.map(drop)
    }

    /// Starts a multipart upload of `bucket/key` with `headers`; returns its upload id.
    pub async fn create_multipart(
        &self,
        bucket: &str,
        key: &str,
        headers: &[(String, String)],
    ) -> Result<String, ClientError> {
        let req = self.signed(reqwest::Method::POST, &Self::path(bucket, Some(key))?, &[("uploads", "")], headers, b"");
        let what = format!("start upload of {bucket}/{key}");
        let text = Self::text(Self::send(req, &what).await?, &what).await?;
        xml_field(&text, "UploadId").map(str::to_string).ok_or_else(|| ClientError::S3 {
            what: format!("start upload of {bucket}/{key}"),
            status: 200,
            code: "MalformedXML".into(),
            message: "the answer names no UploadId".into(),
        })
    }

    /// Uploads part `number` of `upload`; returns its ETag.
    pub async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload: &str,
        number: u32,
        body: Bytes,
    ) -> Result<String, ClientError> {
        let n = number.to_string();
        let query = [("partNumber", n.as_str()), ("uploadId", upload)];
        let req = self
            .signed(reqwest::Method::PUT, &Self::path(bucket, Some(key))?, &query, &[], &body)
            .timeout(Duration::from_secs(600))
            .body(body);
        Ok(Self::etag_of(&Self::send(req, &format!("part {number} of {bucket}/{key}")).await?))
    }

    /// Completes `upload` from `parts` (number, ETag) in order; returns the object's ETag.
    pub async fn complete_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload: &str,
        parts: &[(u32, String)],
    ) -> Result<String, ClientError> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            xml.push_str(&format!("<Part><PartNumber>{n}</PartNumber><ETag>\"{etag}\"</ETag></Part>"));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let what = format!("complete upload of {bucket}/{key}");
        let req = self
            .signed(
                reqwest::Method::POST,
                &Self::path(bucket, Some(key))?,
                &[("uploadId", upload)],
                &[],
                xml.as_bytes(),
            )
            .timeout(Duration::from_secs(600))
            .body(xml);
        // S3 may answer 200 with an error document once the parts are being joined.
        let text = Self::text(Self::send(req, &what).await?, &what).await?;
        if let Some(code) = xml_field(&text, "Code") {
            return Err(ClientError::S3 {
                what,
                status: 200,
                code: code.into(),
                message: xml_field(&text, "Message").unwrap_or("").into(),
            });
        }
        Ok(xml_field(&text, "ETag").unwrap_or("").replace("&quot;", "").trim_matches('"').to_string())
    }

    /// Aborts `upload`, freeing its parts.
    pub async fn abort_multipart(&self, bucket: &str, key: &str, upload: &str) -> Result<(), ClientError> {
        let req =
            self.signed(reqwest::Method::DELETE, &Self::path(bucket, Some(key))?, &[("uploadId", upload)], &[], b"");
        Self::send(req, &format!("abort upload of {bucket}/{key}")).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_are_utc_calendar_dates() {
        assert_eq!(amz_dates(0), ("19700101T000000Z".into(), "19700101".into()));
        // 2000-02-29 12:34:56 UTC: a leap day in a century leap year.
        assert_eq!(amz_dates(951_827_696), ("20000229T123456Z".into(), "20000229".into()));
    }

    /// The client of the AWS SigV4 documentation's examples.
    fn example_client() -> S3Client {
        S3Client::new(
            "https://examplebucket.s3.amazonaws.com",
            "us-east-1",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
        .unwrap()
    }

    /// The GET Object example of the AWS SigV4 documentation (a published test vector).
    #[test]
    fn signatures_match_the_published_aws_example() {
        let c = example_client();
        let empty = sha256_hex(b"");
        let headers: BTreeMap<String, String> = [
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", empty.as_str()),
            ("x-amz-date", "20130524T000000Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // 2013-05-24T00:00:00Z
        let auth = c.authorization(1_369_353_600, "GET", "/test.txt", "", &headers, &empty);
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The GET Bucket (List Objects) example of the same documentation, built by the request
    /// builder: canonical query (sorted, encoded) and the headers it adds.
    #[test]
    fn requests_are_signed_as_the_published_aws_listing_example() {
        let c = example_client();
        // Given out of order: the canonical query sorts them.
        let req = c
            .signed_at(1_369_353_600, reqwest::Method::GET, "/", &[("prefix", "J"), ("max-keys", "2")], &[], b"")
            .build()
            .unwrap();
        assert_eq!(req.url().as_str(), "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J");
        let auth = req.headers()["authorization"].to_str().unwrap();
        assert!(auth.ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"), "{auth}");
        assert!(auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date,"), "{auth}");
    }

    #[test]
    fn header_values_are_signed_trimmed_with_runs_of_spaces_made_one() {
        assert_eq!(canonical_value("  a   b \t c  "), "a b c");
    }

    #[test]
    fn uri_encoding_keeps_only_unreserved_bytes() {
        assert_eq!(uri_encode("a b/c~d_e.f-g", true), "a%20b/c~d_e.f-g");
        assert_eq!(uri_encode("a/b+c=", false), "a%2Fb%2Bc%3D");
        assert_eq!(uri_encode("é", true), "%C3%A9");
    }

    #[test]
    fn keys_a_url_cannot_carry_are_refused_by_name() {
        assert_eq!(S3Client::path("b", Some("x/y z")).unwrap(), "/b/x/y%20z");
        for k in ["a/../b", "./a", "a/."] {
            let e = S3Client::path("b", Some(k)).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn endpoints_must_be_scheme_and_host() {
        assert!(S3Client::new("http://127.0.0.1:9000", "us-east-1", "a", "s").is_ok());
        assert_eq!(S3Client::new("https://s3.example:443", "r", "a", "s").unwrap().host, "s3.example");
        for bad in ["127.0.0.1:9000", "ftp://x", "http://x/bucket", "http://x/?a"] {
            assert!(S3Client::new(bad, "r", "a", "s").is_err(), "{bad}");
        }
        assert!(S3Client::new("http://x", "r", "", "s").is_err());
    }

    #[test]
    fn listings_give_keys_sizes_and_the_next_token() {
        let xml = "<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><NextContinuationToken>t&amp;1</NextContinuationToken>\
                   <Contents><Key>a%2Fb%20c</Key><Size>3</Size></Contents><Contents><Key>x%26y</Key><Size>0</Size></Contents>\
                   </ListBucketResult>";
        let page = parse_list(xml).unwrap();
        assert_eq!(page.objects, vec![("a/b c".to_string(), 3), ("x&y".to_string(), 0)]);
        assert_eq!(page.next.as_deref(), Some("t&1"));
        let last = parse_list("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>").unwrap();
        assert_eq!(last, ListPage::default());
        // Without `EncodingType`, keys are taken as they are.
        let plain = parse_list("<Contents><Key>a%2Fb</Key><Size>1</Size></Contents>").unwrap();
        assert_eq!(plain.objects, vec![("a%2Fb".to_string(), 1)]);
        // Damaged answers are refused, not misread.
        for bad in [
            "<Contents><Key>a</Key></Contents>",
            "<Contents><Key>a</Key><Size>x</Size></Contents>",
            "<EncodingType>url</EncodingType><Contents><Key>%zz</Key><Size>1</Size></Contents>",
            "<IsTruncated>true</IsTruncated>",
        ] {
            assert_eq!(parse_list(bad), None, "{bad}");
        }
        assert_eq!(xml_unescape("&#65;&#x42;&lt;").as_deref(), Some("AB<"));
        assert_eq!(xml_unescape("&bogus;"), None);
    }

    #[test]
    fn error_documents_give_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>gone</Message></Error>";
        assert_eq!(xml_field(xml, "Code"), Some("NoSuchBucket"));
        assert_eq!(xml_field(xml, "Message"), Some("gone"));
        assert_eq!(xml_field(xml, "Resource"), None);
    }
}
