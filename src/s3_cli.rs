//! `archipel s3 keys …`: scoped, expiring, revocable S3 access keys backed by capability tokens.
//!
//! `create` mints a token with the tenant's key and registers it at the gateway, which answers
//! the S3 credentials; `attenuate` narrows a token without any key (to hand it on); `register`
//! exchanges a token someone handed you for credentials; `revoke` lists a token on the ledger,
//! after which every gateway of the tenant refuses it and every token attenuated from it.

use crate::storage_cli::Tenant;
use anyhow::{Context as _, Result, anyhow, bail};
use archipel_gateway::tokens::{Authority, Scope, attenuate_base64, parse_duration, revocation_ids};
use archipel_ledger::Payload;
use clap::{Args, Subcommand};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// `archipel s3`.
#[derive(Subcommand, Debug)]
pub enum S3Command {
    /// Scoped access keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// What a key or attenuation allows.
#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// Only this bucket.
    #[arg(long)]
    bucket: Option<String>,
    /// Only keys (and listings) under this prefix.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Reads only: GET, HEAD, listings.
    #[arg(long)]
    read_only: bool,
    /// Refused after this long: `7d`, `12h`, `30m`.
    #[arg(long)]
    expires: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> Result<Scope> {
        let expires_s = match &self.expires {
            Some(d) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                Some(now + parse_duration(d).map_err(|e| anyhow!("--expires: {e}"))?.as_secs())
            }
            None => None,
        };
        if let Some(b) = &self.bucket {
            archipel_ledger::storage::check_bucket_name(b).map_err(|e| anyhow!("--bucket: {e}"))?;
        }
        Ok(Scope { bucket: self.bucket.clone(), prefix: self.prefix.clone(), read_only: self.read_only, expires_s })
    }
}

/// Where the gateway is.
#[derive(Args, Debug, Clone)]
pub struct GatewayArg {
    /// The S3 gateway's endpoint (default: the local devnet's).
    #[arg(long, env = "ARCHIPEL_GATEWAY")]
    gateway: Option<String>,
}

impl GatewayArg {
    fn endpoint(&self) -> Result<String> {
        if let Some(g) = &self.gateway {
            return Ok(g.trim_end_matches('/').to_string());
        }
        crate::devnet::gateway_endpoint(Path::new(crate::devnet::DEFAULT_DIR))
            .ok_or_else(|| anyhow!("no gateway given: pass --gateway http://HOST:PORT, or start `archipel devnet`"))
    }
}

/// `archipel s3 keys`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Mint a token for a scope with your key and get S3 credentials for it from the gateway.
    /// Example: `archipel s3 keys create --bucket photos --prefix 2026/ --read-only --expires 7d`.
    Create {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        gateway: GatewayArg,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Narrow a token (no key needed) to hand it on; prints the new token.
    Attenuate {
        /// The token (base64).
        token: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exchange a token for S3 credentials at a gateway.
    Register {
        /// The token (base64).
        token: String,
        #[command(flatten)]
        gateway: GatewayArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token on the ledger (and every token attenuated from it); returns once final.
    Revoke {
        /// The token (base64).
        token: String,
        #[command(flatten)]
        tenant: Tenant,
    },
}

async fn register(endpoint: &str, token: &str) -> Result<(String, String)> {
    let url = format!("{endpoint}/?archipel-register-key");
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(&url)
        .body(token.to_string())
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {endpoint}: is it running? pass --gateway"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = text
            .split("<Message>")
            .nth(1)
            .and_then(|m| m.split("</Message>").next())
            .unwrap_or(text.as_str())
            .to_string();
        bail!("the gateway refused the token ({status}): {message}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    let field = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("unexpected answer: {text}"));
    Ok((field("access_key_id")?, field("secret_access_key")?))
}

fn print_credentials(endpoint: &str, access: &str, secret: &str, token: &str, json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "endpoint": endpoint, "access_key_id": access, "secret_access_key": secret, "token": token,
            }))?
        );
    } else {
        println!("AWS_ACCESS_KEY_ID={access}");
        println!("AWS_SECRET_ACCESS_KEY={secret}");
        println!("AWS_ENDPOINT_URL={endpoint}");
        println!("token (hand it on, attenuate it, or revoke it): {token}");
    }
    Ok(())
}

/// Runs `archipel s3 …`.
pub async fn run(cmd: S3Command) -> Result<()> {
    let S3Command::Keys { command } = cmd;
    match command {
        KeysCommand::Create { scope, gateway, tenant } => {
            let c = crate::storage_cli::client(&tenant)?;
            let token = Authority::of(c.identity()).mint(&scope.scope()?)?.to_base64()?;
            let endpoint = gateway.endpoint()?;
            let (access, secret) = register(&endpoint, &token).await?;
            print_credentials(&endpoint, &access, &secret, &token, tenant.json)
        }
        KeysCommand::Attenuate { token, scope, json } => {
            let narrowed = attenuate_base64(&token, &scope.scope()?)?;
            if json {
                println!("{}", serde_json::json!({ "token": narrowed }));
            } else {
                println!("{narrowed}");
            }
            Ok(())
        }
        KeysCommand::Register { token, gateway, json } => {
            let endpoint = gateway.endpoint()?;
            let (access, secret) = register(&endpoint, &token).await?;
            print_credentials(&endpoint, &access, &secret, &token, json)
        }
        KeysCommand::Revoke { token, tenant } => {
            let c = crate::storage_cli::client(&tenant)?;
            let parsed = Authority::of(c.identity()).parse(&token)?;
            // The token's own block: it and what was attenuated from it, not its parents.
            let id = *revocation_ids(&parsed).last().ok_or_else(|| anyhow!("the token has no block"))?;
            let r = c.submit(Payload::RevokeTokens { ids: vec![id] }).await?;
            if tenant.json {
                println!("{}", serde_json::json!({"revoked": id, "tx": r.hash, "height": r.height}));
            } else {
                println!(
                    "token revoked — final in block {}; gateways refuse it within {} s",
                    r.height,
                    archipel_gateway::keys::REVOCATION_POLL.as_secs().max(1)
                );
            }
            Ok(())
        }
    }
}
