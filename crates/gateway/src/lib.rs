//! The S3 gateway: unmodified S3 clients (aws-cli, boto3, rclone) in front of archipel's object
//! pipeline.
//!
//! The gateway runs on the tenant's side. It holds the tenant's key, so it encrypts, erasure-codes
//! and places objects itself ([`archipel_objects`]); storage nodes only ever see ciphertext
//! shards. It speaks S3 with [`s3s`]: requests are checked (SigV4, header and query signatures,
//! streaming chunk signatures) against the access keys in [`keys`] before any operation runs.
//!
//! - [`s3`]: the S3 operations over a [`TenantClient`](archipel_objects::tenant::TenantClient).
//! - [`keys`]: access keys and what each may do.
//! - [`multipart`]: multipart uploads.
//! - [`serve`]: the HTTP listener.

pub mod keys;
pub mod multipart;
pub mod s3;

use archipel_objects::tenant::TenantClient;
use archipel_types::PlacementPolicy;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::PathBuf;
use std::sync::Arc;

/// What a gateway needs.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The tenant's client: its key and the nodes it talks to.
    pub tenant: Arc<TenantClient>,
    /// The policy of buckets created through S3 (S3 has no words for a geofence, except a
    /// location constraint naming a region or area, which narrows it).
    pub default_policy: PlacementPolicy,
    /// Where multipart uploads keep their parts until completed.
    pub spool: PathBuf,
    /// The access keys.
    pub keys: Arc<keys::Keys>,
}

/// Builds the S3 service of `config`.
pub fn service(config: GatewayConfig) -> std::io::Result<s3s::service::S3Service> {
    let multipart = multipart::Uploads::open(&config.spool)?;
    let s3 = s3::Archipel::new(config.tenant, config.default_policy, multipart);
    let mut builder = s3s::service::S3ServiceBuilder::new(s3);
    builder.set_auth(keys::Auth(config.keys.clone()));
    builder.set_access(keys::Access(config.keys));
    Ok(builder.build())
}

/// Serves S3 on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: s3s::service::S3Service,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
        let service = service.clone();
        let http = http.clone();
        tokio::spawn(async move {
            if let Err(e) = http.serve_connection(TokioIo::new(socket), service).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}
