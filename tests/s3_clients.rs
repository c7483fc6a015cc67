//! Real S3 clients against a real devnet's gateway: runs `tests/s3/test_clients.py` (boto3,
//! aws-cli, rclone, end-to-end encryption, bad input, export to moto's S3 server) with pytest from a Python venv this test
//! makes once under the target directory, so `cargo test --workspace` runs them too.
//!
//! Needs `python3` with `venv` (Debian: python3-venv) and PyPI for the first run; rclone
//! (Debian: rclone) is used when installed — `.ci/run` installs it — and its session is skipped,
//! saying so, when it is not.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the venv holds, pinned.
/// moto's S3 server (with Flask) is the third-party S3 endpoint the export test writes to.
const PACKAGES: &[&str] = &[
    "boto3==1.44.8",
    "botocore==1.44.8",
    "awscli==1.46.3",
    "pytest==9.2.0",
    "moto[s3]==5.2.5",
    "flask==3.1.3",
    "flask-cors==6.0.5",
];

/// The venv, made (or completed) on first use.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("s3-venv");
    let python = dir.join("bin/python");
    let stamp = dir.join("archipel-packages.txt");
    let wanted = PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return dir;
    }
    let made = Command::new("python3").args(["-m", "venv"]).arg(&dir).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "cannot make a Python venv in {}: install python3 and python3-venv (apt-get install python3-venv)",
        dir.display()
    );
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES)
        .status()
        .expect("run pip");
    assert!(pip.success(), "pip could not install {PACKAGES:?} into {}: is PyPI reachable?", dir.display());
    std::fs::write(&stamp, wanted).unwrap();
    dir
}

#[test]
fn boto3_aws_cli_and_rclone_sessions_against_the_devnet_gateway() {
    let venv = venv();
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(
        work.path(),
        &["--nodes", "6", "--base-ip", "127.0.94.2", "--base-port", "26900", "--s3-listen", "127.0.94.1:26999"],
    );
    let gw = devnet.state()["gateway"].clone();
    assert_eq!(gw["endpoint"], "http://127.0.94.1:26999", "devnet.json names the gateway: {gw}");
    wait_storage_up(&devnet.node(0).1, 6);
    if which("rclone").is_none() {
        // .ci/run installs rclone and sets ARCHIPEL_CI: there, a missing rclone is a failure.
        assert!(std::env::var_os("ARCHIPEL_CI").is_none(), "rclone is missing under .ci/run");
        eprintln!("note: rclone is not installed (apt-get install rclone): its session is skipped");
    }
    let path = format!("{}:{}", venv.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let nodes: Vec<String> = (0..devnet.state()["nodes"].as_array().unwrap().len()).map(|i| devnet.node(i).1).collect();
    let out = Command::new(venv.join("bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/test_clients.py"))
        .current_dir(work.path())
        .env("PATH", path)
        .env("ARCHIPEL_S3_ENDPOINT", gw["endpoint"].as_str().unwrap())
        .env("AWS_ACCESS_KEY_ID", gw["access_key_id"].as_str().unwrap())
        .env("AWS_SECRET_ACCESS_KEY", gw["secret_access_key"].as_str().unwrap())
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("ARCHIPEL_DEVNET_DIR", &devnet.dir)
        .env("ARCHIPEL_BIN", bin())
        // Every node: the CLI's reads of absence and listings are checked at the freshest of them.
        .env("ARCHIPEL_NODE", nodes.join(","))
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run pytest");
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // pytest: 0 all passed, 1 some failed, 2-4 usage or collection errors, 5 nothing collected.
    assert!(out.status.success(), "the S3 client tests failed (exit {:?}):\n{report}", out.status.code());
    println!("{report}");
    assert!(report.contains("passed"), "{report}");

    // The standalone `archipel gateway` (what a tenant runs on its own machine), with its own
    // bucket policy flags: a boto3 session through it, and the bucket it made fenced as told.
    let gw_dir = work.path().join("standalone");
    /// Killed when dropped, also when an assertion fails first.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut gateway = Command::new(bin())
        .args(["gateway", "--listen", "127.0.94.1:26998", "--nodes", &nodes.join(",")])
        .args(["--key", devnet.dir.join("tenant.key").to_str().unwrap(), "--dir", gw_dir.to_str().unwrap()])
        .args(["--code", "3+2", "--regions", "eu", "--deny-jurisdictions", "US", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start archipel gateway");
    let stdout = gateway.stdout.take().unwrap();
    let _gateway = Killed(gateway);
    // It prints its JSON (over several lines) once listening.
    let mut out = std::io::BufReader::new(stdout);
    let mut text = String::new();
    let info: serde_json::Value = loop {
        let read = std::io::BufRead::read_line(&mut out, &mut text).unwrap();
        if let Ok(v) = serde_json::from_str(&text) {
            break v;
        }
        assert!(read > 0, "the gateway ended before saying where it listens: {text:?}");
    };
    assert_eq!(info["endpoint"], "http://127.0.94.1:26998", "{info}");
    let script = "import boto3, sys\n\
        s3 = boto3.client('s3', endpoint_url=sys.argv[1])\n\
        s3.create_bucket(Bucket='standalone')\n\
        s3.put_object(Bucket='standalone', Key='k', Body=b'through the standalone gateway')\n\
        assert s3.get_object(Bucket='standalone', Key='k')['Body'].read() == b'through the standalone gateway'\n\
        assert [o['Key'] for o in s3.list_objects_v2(Bucket='standalone')['Contents']] == ['k']\n";
    let session = Command::new(venv.join("bin/python"))
        .args(["-c", script, info["endpoint"].as_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", info["access_key_id"].as_str().unwrap())
        .env("AWS_SECRET_ACCESS_KEY", info["secret_access_key"].as_str().unwrap())
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("run boto3");
    assert!(
        session.status.success(),
        "the standalone gateway session failed:\n{}",
        String::from_utf8_lossy(&session.stderr)
    );
    let key = devnet.dir.join("tenant.key");
    let shown = run(
        work.path(),
        &["bucket", "show", "standalone", "--json", "--key", key.to_str().unwrap(), "--node", &nodes[0]],
    );
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let policy = shown["policy"].to_string();
    assert!(policy.contains("3+2") && policy.contains("\"eu\"") && policy.contains("\"US\""), "{shown}");
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}
