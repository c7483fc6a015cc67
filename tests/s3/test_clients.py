"""Real S3 clients against a devnet's gateway: boto3, aws-cli and rclone each run a scripted session
(make a bucket, upload a large file in parts, list, download, compare bytes, presign and fetch with
curl, delete, remove the bucket), plus end-to-end encryption and bad input.

Run by `tests/s3_clients.rs` (part of `cargo test --workspace`), which starts the devnet, makes the
Python venv and passes the gateway's endpoint and root keys in the environment.
"""

import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import boto3
import botocore
import pytest
from botocore.config import Config

ENDPOINT = os.environ["ARCHIPEL_S3_ENDPOINT"]
ACCESS = os.environ["AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
DEVNET = os.environ["ARCHIPEL_DEVNET_DIR"]
MIB = 1 << 20


def client(access=ACCESS, secret=SECRET):
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def bucket_name(tag):
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def big_file(tmp_path, name, size):
    path = tmp_path / name
    # Incompressible and different every run.
    path.write_bytes(os.urandom(size))
    return path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def curl(url):
    out = subprocess.run(["curl", "-sS", "-f", "-o", "-", url], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def error_code(fn):
    with pytest.raises(botocore.exceptions.ClientError) as e:
        fn()
    return e.value.response["Error"]["Code"]


def test_boto3_session(tmp_path):
    s3 = client()
    b = bucket_name("boto")
    s3.create_bucket(Bucket=b)
    assert b in [x["Name"] for x in s3.list_buckets()["Buckets"]]
    src = big_file(tmp_path, "big.bin", 20 * MIB + 12345)
    # 8 MiB parts: a multipart upload of three parts.
    cfg = boto3.s3.transfer.TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    s3.upload_file(str(src), b, "data/big.bin", Config=cfg, ExtraArgs={"Metadata": {"team": "storage"}, "ContentType": "application/x-test"})
    head = s3.head_object(Bucket=b, Key="data/big.bin")
    assert head["ContentLength"] == src.stat().st_size
    assert head["Metadata"] == {"team": "storage"}
    assert head["ContentType"] == "application/x-test"
    assert head["ETag"].strip('"').endswith("-3")
    for i in range(5):
        s3.put_object(Bucket=b, Key=f"data/small/{i}.txt", Body=f"small {i}".encode())
    s3.put_object(Bucket=b, Key="top.txt", Body=b"top")
    # Listing: delimiter, prefix, and pages of two keys with continuation tokens.
    top = s3.list_objects_v2(Bucket=b, Delimiter="/")
    assert [c["Prefix"] for c in top["CommonPrefixes"]] == ["data/"]
    assert [o["Key"] for o in top["Contents"]] == ["top.txt"]
    keys, token = [], None
    while True:
        kw = {"Bucket": b, "Prefix": "data/small/", "MaxKeys": 2}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert keys == [f"data/small/{i}.txt" for i in range(5)]
    # Delimiter and pages together: every group and key once, in order, v2 tokens and v1 markers.
    listed = ["list/a/1", "list/a/2", "list/b/1", "list/c", "list/d/x", "list/e f+\u00e9"]
    for k in listed:
        s3.put_object(Bucket=b, Key=k, Body=b"l")
    want = ["list/a/", "list/b/", "list/c", "list/d/", "list/e f+\u00e9"]
    seen, token = [], None
    while True:
        kw = {"Bucket": b, "Prefix": "list/", "Delimiter": "/", "MaxKeys": 1}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])] + [o["Key"] for o in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == want, seen
    seen, marker = [], ""
    while True:
        page = s3.list_objects(Bucket=b, Prefix="list/", Delimiter="/", MaxKeys=2, Marker=marker)
        seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])] + [o["Key"] for o in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        marker = page["NextMarker"]
    assert sorted(seen) == want, seen
    s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in listed]})
    # Download and compare.
    out = tmp_path / "big.out"
    s3.download_file(b, "data/big.bin", str(out))
    assert sha(out) == sha(src)
    # Range GET.
    part = s3.get_object(Bucket=b, Key="data/big.bin", Range="bytes=8388600-8388700")
    assert part["Body"].read() == src.read_bytes()[8388600:8388701]
    assert part["ContentRange"] == f"bytes 8388600-8388700/{src.stat().st_size}"
    # Conditional requests.
    etag = s3.head_object(Bucket=b, Key="top.txt")["ETag"]
    assert etag.strip('"') == hashlib.md5(b"top").hexdigest()
    assert error_code(lambda: s3.get_object(Bucket=b, Key="top.txt", IfNoneMatch=etag)) == "304"
    assert error_code(lambda: s3.get_object(Bucket=b, Key="top.txt", IfMatch='"nope"')) == "PreconditionFailed"
    assert s3.get_object(Bucket=b, Key="top.txt", IfMatch=etag)["Body"].read() == b"top"
    assert error_code(lambda: s3.put_object(Bucket=b, Key="top.txt", Body=b"x", IfNoneMatch="*")) == "PreconditionFailed"
    # If-Modified-Since, on GET and HEAD: not modified since a later time is 304; since an earlier one, the object.
    import datetime
    modified = s3.head_object(Bucket=b, Key="top.txt")["LastModified"]
    later, earlier = modified + datetime.timedelta(seconds=5), modified - datetime.timedelta(days=1)
    assert error_code(lambda: s3.get_object(Bucket=b, Key="top.txt", IfModifiedSince=later)) == "304"
    assert error_code(lambda: s3.head_object(Bucket=b, Key="top.txt", IfModifiedSince=later)) == "304"
    # What caches send: the Last-Modified they were given (HTTP dates count whole seconds).
    assert error_code(lambda: s3.get_object(Bucket=b, Key="top.txt", IfModifiedSince=modified)) == "304"
    assert s3.get_object(Bucket=b, Key="top.txt", IfModifiedSince=earlier)["Body"].read() == b"top"
    assert s3.head_object(Bucket=b, Key="top.txt", IfModifiedSince=earlier)["ETag"] == etag
    # Copy keeps the metadata unless replaced.
    s3.copy_object(Bucket=b, Key="copy.bin", CopySource={"Bucket": b, "Key": "data/big.bin"})
    assert s3.head_object(Bucket=b, Key="copy.bin")["Metadata"] == {"team": "storage"}
    assert hashlib.sha256(s3.get_object(Bucket=b, Key="copy.bin")["Body"].read()).hexdigest() == sha(src)
    across = s3.get_object(Bucket=b, Key="copy.bin", Range="bytes=8388000-8389000")["Body"].read()
    assert across == src.read_bytes()[8388000:8389001]
    # The multipart ETag is S3's: the MD5 of the parts' MD5s, then the count.
    data = src.read_bytes()
    parts = [hashlib.md5(data[i:i + 8 * MIB]).digest() for i in range(0, len(data), 8 * MIB)]
    assert head["ETag"].strip('"') == hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    # A single PUT of more than one segment: its ETag is the MD5 of every byte.
    s3.put_object(Bucket=b, Key="single.bin", Body=data[: 9 * MIB])
    assert s3.head_object(Bucket=b, Key="single.bin")["ETag"].strip('"') == hashlib.md5(data[: 9 * MIB]).hexdigest()
    # Content-MD5 is checked: a body that differs from it is not stored.
    import base64
    wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    assert error_code(lambda: s3.put_object(Bucket=b, Key="digest.txt", Body=b"body", ContentMD5=wrong)) == "BadDigest"
    assert error_code(lambda: s3.head_object(Bucket=b, Key="digest.txt")) == "404"
    s3.copy_object(Bucket=b, Key="copy2.txt", CopySource=f"{b}/top.txt", MetadataDirective="REPLACE", Metadata={"v": "2"})
    assert s3.head_object(Bucket=b, Key="copy2.txt")["Metadata"] == {"v": "2"}
    assert s3.get_object(Bucket=b, Key="copy2.txt")["Body"].read() == b"top"
    # Presigned URL fetched with curl.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "top.txt"}, ExpiresIn=300)
    assert curl(url) == b"top"
    # ... and only with its signature, before it expires.
    def status(u):
        try:
            return urllib.request.urlopen(u, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code
    import re
    def tampered(u):
        return re.sub(r"(Signature=)(.)", lambda m: m.group(1) + ("0" if m.group(2) != "0" else "1"), u, count=1)
    assert status(tampered(url)) == 403
    # SigV4 query signatures too (boto3 presigns with SigV2 unless asked).
    v4 = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                      region_name="us-east-1", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    url4 = v4.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "top.txt"}, ExpiresIn=300)
    assert "X-Amz-Signature=" in url4 and curl(url4) == b"top"
    assert status(tampered(url4)) == 403
    assert status(f"{ENDPOINT}/{b}/top.txt") == 403
    short = s3.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "top.txt"}, ExpiresIn=1)
    time.sleep(2.1)
    assert status(short) == 403
    # Multipart by hand, parts in order: each streams into segments as it arrives; the gateway
    # keeps no part, only the carry (under one segment). Then part 3 before part 2: spooled
    # until part 2 comes. Then a streamed part sent again with other bytes: refused.
    up = s3.create_multipart_upload(Bucket=b, Key="streamed.bin")["UploadId"]
    spool_dir = os.path.join(DEVNET, "gateway", "spool", up)
    pieces = [os.urandom(5 * MIB) for _ in range(4)] + [b"tail"]
    etags = {1: s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=1, Body=pieces[0])["ETag"]}
    assert not [f for f in os.listdir(spool_dir) if f.startswith("part-")]
    assert sum(os.path.getsize(os.path.join(spool_dir, f)) for f in os.listdir(spool_dir) if f.startswith("carry.")) < 8 * MIB
    etags[3] = s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=3, Body=pieces[2])["ETag"]
    assert [f for f in os.listdir(spool_dir) if f.startswith("part-3.")]
    etags[2] = s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=2, Body=pieces[1])["ETag"]
    assert not [f for f in os.listdir(spool_dir) if f.startswith("part-")]
    assert error_code(lambda: s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=2, Body=pieces[3])) == "InvalidRequest"
    etags[4] = s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=4, Body=pieces[3])["ETag"]
    etags[5] = s3.upload_part(Bucket=b, Key="streamed.bin", UploadId=up, PartNumber=5, Body=pieces[4])["ETag"]
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=b, Key="streamed.bin", UploadId=up)["Parts"]] == [1, 2, 3, 4, 5]
    s3.complete_multipart_upload(Bucket=b, Key="streamed.bin", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(etags.items())]})
    assert s3.get_object(Bucket=b, Key="streamed.bin")["Body"].read() == b"".join(pieces)
    assert not os.path.exists(spool_dir)
    # Multipart by hand: list parts, abort.
    up = s3.create_multipart_upload(Bucket=b, Key="aborted.bin")
    s3.upload_part(Bucket=b, Key="aborted.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=b, Key="aborted.bin", UploadId=up["UploadId"])["Parts"]] == [1]
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=b).get("Uploads", [])] == ["aborted.bin"]
    s3.abort_multipart_upload(Bucket=b, Key="aborted.bin", UploadId=up["UploadId"])
    assert error_code(lambda: s3.list_parts(Bucket=b, Key="aborted.bin", UploadId=up["UploadId"])) == "NoSuchUpload"
    assert error_code(lambda: s3.head_object(Bucket=b, Key="aborted.bin")) == "404"
    # A bucket with objects is not removed.
    assert error_code(lambda: s3.delete_bucket(Bucket=b)) == "BucketNotEmpty"
    # Delete everything, in one DeleteObjects, and the bucket.
    everything = [o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]]
    r = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in everything]})
    assert sorted(d["Key"] for d in r["Deleted"]) == sorted(everything)
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    s3.delete_bucket(Bucket=b)
    assert error_code(lambda: s3.head_bucket(Bucket=b)) == "404"


def aws(*args, check=True):
    env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="2")
    out = subprocess.run(["aws", "--endpoint-url", ENDPOINT, *args], capture_output=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, f"aws {' '.join(args)}: {out.stderr.decode()}"
    return out.stdout.decode()


def test_aws_cli_session(tmp_path):
    b = bucket_name("awscli")
    aws("s3", "mb", f"s3://{b}")
    src = big_file(tmp_path, "big.bin", 25 * MIB)
    # aws-cli uploads files over 8 MiB in 8 MiB parts.
    aws("s3", "cp", "--only-show-errors", str(src), f"s3://{b}/big.bin")
    listing = aws("s3", "ls", f"s3://{b}/")
    assert "big.bin" in listing and str(25 * MIB) in listing
    out = tmp_path / "big.out"
    aws("s3", "cp", "--only-show-errors", f"s3://{b}/big.bin", str(out))
    assert sha(out) == sha(src)
    url = aws("s3", "presign", f"s3://{b}/big.bin", "--expires-in", "300").strip()
    assert hashlib.sha256(curl(url)).hexdigest() == sha(src)
    aws("s3", "rm", "--only-show-errors", f"s3://{b}/big.bin")
    aws("s3", "rb", f"s3://{b}")
    assert b not in aws("s3", "ls")


def rclone(*args):
    env = dict(
        os.environ,
        RCLONE_CONFIG_ARCH_TYPE="s3",
        RCLONE_CONFIG_ARCH_PROVIDER="Other",
        RCLONE_CONFIG_ARCH_ACCESS_KEY_ID=ACCESS,
        RCLONE_CONFIG_ARCH_SECRET_ACCESS_KEY=SECRET,
        RCLONE_CONFIG_ARCH_ENDPOINT=ENDPOINT,
        RCLONE_CONFIG_ARCH_REGION="us-east-1",
        RCLONE_CONFIG_ARCH_FORCE_PATH_STYLE="true",
    )
    # rclone's SDK refuses a CA bundle on a plain-HTTP transport; the endpoint is loopback HTTP.
    env.pop("AWS_CA_BUNDLE", None)
    out = subprocess.run(["rclone", "--config", "/dev/null", *args], capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, f"rclone {' '.join(args)}: {out.stderr.decode()}"
    return out.stdout.decode()


@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (apt-get install rclone)")
def test_rclone_session(tmp_path):
    b = bucket_name("rclone")
    rclone("mkdir", f"arch:{b}")
    src = big_file(tmp_path, "big.bin", 22 * MIB)
    # rclone's default 5 MiB chunks, above a 10 MiB cutoff: a multipart upload of five parts.
    rclone("copyto", "--s3-upload-cutoff", "10M", str(src), f"arch:{b}/dir/big.bin")
    assert "big.bin" in rclone("ls", f"arch:{b}")
    out = tmp_path / "big.out"
    rclone("copyto", f"arch:{b}/dir/big.bin", str(out))
    assert sha(out) == sha(src)
    # rclone compares hashes itself: a small file's ETag is its MD5.
    small = tmp_path / "small.txt"
    small.write_bytes(b"rclone small file")
    rclone("copyto", str(small), f"arch:{b}/small.txt")
    assert rclone("md5sum", f"arch:{b}/small.txt").split()[0] == hashlib.md5(b"rclone small file").hexdigest()
    url = rclone("link", "--expire", "5m", f"arch:{b}/small.txt").strip()
    assert curl(url) == b"rclone small file"
    rclone("delete", f"arch:{b}")
    rclone("rmdir", f"arch:{b}")
    assert b not in rclone("lsd", "arch:")


def test_nodes_only_ever_see_ciphertext(tmp_path):
    marker = f"archipel-plaintext-marker-{uuid.uuid4().hex}".encode()
    b = bucket_name("e2e")
    aws("s3", "mb", f"s3://{b}")
    src = tmp_path / "marker.txt"
    # The marker many times over, in an object of two segments, and once in the metadata.
    src.write_bytes(marker * (9 * MIB // len(marker)))
    aws("s3", "cp", "--only-show-errors", "--metadata", f"note={marker.decode()}", str(src), f"s3://{b}/marker.txt")
    out = tmp_path / "back.txt"
    aws("s3", "cp", "--only-show-errors", f"s3://{b}/marker.txt", str(out))
    assert out.read_bytes() == src.read_bytes()
    nodes = os.path.join(DEVNET, "nodes")
    scanned = 0
    shard_bytes = 0
    for root, _, files in os.walk(nodes):
        for f in files:
            path = os.path.join(root, f)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                continue  # removed while walking (a pruned log)
            scanned += len(data)
            if os.sep + "shards" + os.sep in path:
                shard_bytes += len(data)
            assert marker not in data, f"plaintext marker found in {path}"
    # The object's shards are among what was scanned: 4+2 of 9 MiB is at least 13.5 MiB of shards.
    assert shard_bytes >= 13 * MIB, f"only {shard_bytes} bytes of shards under {nodes}"
    # And the gateway's spool kept no plaintext part.
    spool = os.path.join(DEVNET, "gateway", "spool")
    for root, _, files in os.walk(spool):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert marker not in fh.read()
    aws("s3", "rm", "--only-show-errors", f"s3://{b}/marker.txt")
    aws("s3", "rb", f"s3://{b}")


def raw_request(data, timeout=30, hang_up=True):
    """Sends `data` on a new connection (then hangs up the sending side, if `hang_up`) and reads
    the answer until the gateway closes."""
    host, port = ENDPOINT.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if hang_up:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)


def signed_raw(method, path, body, send):
    """A request signed (SigV4, payload hash included) for `body`, of which only `send` bytes go."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = ENDPOINT.removeprefix("http://")
    req = AWSRequest(method=method, url=f"{ENDPOINT}{path}", data=body, headers={"Host": host})
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", "us-east-1").add_auth(req)
    headers = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "content-length")
    head = f"{method} {path} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return raw_request(head.encode() + body[:send], hang_up=send < len(body))


def test_bad_input_gets_s3_errors_and_stores_nothing(tmp_path):
    s3 = client()
    b = bucket_name("bad")
    s3.create_bucket(Bucket=b)
    # Wrong signature, unknown key.
    assert error_code(lambda: client(secret="wrong" * 8).list_objects_v2(Bucket=b)) == "SignatureDoesNotMatch"
    assert error_code(lambda: client(access="AKNOTAKEY0000000000", secret="x" * 40).list_buckets()) == "InvalidAccessKeyId"
    # Unsigned.
    try:
        urllib.request.urlopen(f"{ENDPOINT}/{b}", timeout=10)
        raise AssertionError("an unsigned request was served")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and b"AccessDenied" in e.read()
    # Malformed XML.
    def bad_delete(request, **_):
        request.data = b"<Delete><Object><Key>unterminated"
        request.headers["Content-Length"] = str(len(request.data))
    s3.meta.events.register_first("before-sign.s3.DeleteObjects", bad_delete)
    assert error_code(lambda: s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "a"}]})) == "MalformedXML"
    s3.meta.events.unregister("before-sign.s3.DeleteObjects", bad_delete)
    # Invalid names and ranges.
    assert error_code(lambda: s3.create_bucket(Bucket="Bad_Bucket")) in ("InvalidBucketName", "InvalidRequest")
    s3.put_object(Bucket=b, Key="k", Body=b"0123456789")
    assert error_code(lambda: s3.get_object(Bucket=b, Key="k", Range="bytes=50-60")) == "InvalidRange"
    assert error_code(lambda: s3.get_object(Bucket=b, Key="missing")) == "NoSuchKey"
    assert error_code(lambda: s3.list_objects_v2(Bucket="no-such-bucket-here")) == "NoSuchBucket"
    assert error_code(lambda: s3.list_objects_v2(Bucket=b, ContinuationToken="zz-not-hex")) == "InvalidArgument"
    assert error_code(lambda: s3.complete_multipart_upload(Bucket=b, Key="k", UploadId="0" * 32, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": "x"}]})) == "NoSuchUpload"
    # A truncated upload: signed for 100000 bytes, the connection ends after 1000. Nothing is stored.
    answer = signed_raw("PUT", f"/{b}/truncated", b"y" * 100_000, send=1000)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:300]
    assert error_code(lambda: s3.head_object(Bucket=b, Key="truncated")) == "404"
    # The same request whole is stored: the truncation was the only thing wrong with it.
    answer = signed_raw("PUT", f"/{b}/whole", b"y" * 100_000, send=100_000)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert s3.head_object(Bucket=b, Key="whole")["ContentLength"] == 100_000
    s3.delete_object(Bucket=b, Key="whole")
    # The same beyond one segment, where the body streams into the pipeline as it arrives.
    answer = signed_raw("PUT", f"/{b}/truncated-big", b"z" * (20 * MIB), send=12 * MIB)
    assert answer == b"" or (answer.startswith(b"HTTP/1.1 400") and b"IncompleteBody" in answer), answer[:300]
    assert error_code(lambda: s3.head_object(Bucket=b, Key="truncated-big")) == "404"
    # A part cut off is not kept.
    up = s3.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    answer = signed_raw("PUT", f"/{b}/mp?partNumber=1&uploadId={up}", b"p" * (6 * MIB), send=MIB)
    assert answer == b"" or (answer.startswith(b"HTTP/1.1 400") and b"IncompleteBody" in answer), answer[:300]
    assert s3.list_parts(Bucket=b, Key="mp", UploadId=up).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket=b, Key="mp", UploadId=up)
    # Malformed XML deleted nothing.
    s3.put_object(Bucket=b, Key="kept", Body=b"kept")
    s3.meta.events.register_first("before-sign.s3.DeleteObjects", bad_delete)
    assert error_code(lambda: s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "kept"}]})) == "MalformedXML"
    s3.meta.events.unregister("before-sign.s3.DeleteObjects", bad_delete)
    assert s3.get_object(Bucket=b, Key="kept")["Body"].read() == b"kept"
    s3.delete_object(Bucket=b, Key="kept")
    # An answer sent before the body was read closes the connection: a client told `Expect:
    # 100-continue` may or may not send the body, so the bytes after the answer could be either
    # that body or its next request (botocore's DELETE after a refused PUT arrived as ELETE and
    # failed its signature). Here the next request follows at once: it must not be read as the
    # body, nor its remainder as a request.
    refused = f"PUT /{b}/refused HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n"
    following = f"GET /{b} HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        answer = raw_request((refused + following).encode(), timeout=10, hang_up=False)
    except socket.timeout:
        raise AssertionError("the gateway kept the connection open after answering before reading the body")
    assert answer.startswith(b"HTTP/1.1 403") and b"\r\nconnection: close\r\n" in answer.lower(), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, f"a second answer came on the same connection: {answer!r}"
    # Oversized headers and garbage: an HTTP error, and the gateway still serves.
    answer = raw_request(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", hang_up=False)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # A large header under the bound is served.
    assert s3.get_object(Bucket=b, Key="k", ResponseContentDisposition="x" * 20_000)["Body"].read() == b"0123456789"
    answer = raw_request(b"\x00\x01garbage\r\n\r\n")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    # An operation the gateway does not implement.
    assert error_code(lambda: s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})) == "NotImplemented"
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"0123456789"
    s3.delete_object(Bucket=b, Key="k")
    s3.delete_bucket(Bucket=b)


def chunked_put(path, chunks, corrupt=None, tamper=None, query=None):
    """PUTs `chunks` as an aws-chunked body (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`, as the AWS SDKs
    send it), each chunk signed and chained to the one before; the signature sent for chunk number
    `corrupt` (the final empty chunk is number `len(chunks)`) has one digit changed; chunk number
    `tamper` has its last byte changed after signing. `query`: the request's query parameters."""
    from urllib.parse import quote
    host = ENDPOINT.removeprefix("http://")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{stamp[:8]}/us-east-1/s3/aws4_request"
    key = ("AWS4" + SECRET).encode()
    for part in (stamp[:8], "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    streaming = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    headers = {"content-encoding": "aws-chunked", "host": host, "x-amz-content-sha256": streaming,
               "x-amz-date": stamp, "x-amz-decoded-content-length": str(sum(map(len, chunks)))}
    names = ";".join(sorted(headers))
    canonical_query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted((query or {}).items()))
    canonical = "\n".join(["PUT", path, canonical_query, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), names, streaming])
    seed = hmac.new(key, "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]).encode(),
                    hashlib.sha256).hexdigest()
    previous, body = seed, b""
    for i, chunk in enumerate(chunks + [b""]):
        to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", stamp, scope, previous, hashlib.sha256(b"").hexdigest(),
                             hashlib.sha256(chunk).hexdigest()])
        previous = sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if i == corrupt:
            sig = ("1" if sig[0] == "0" else "0") + sig[1:]
        if i == tamper:
            chunk = chunk[:-1] + bytes([chunk[-1] ^ 1])
        body += f"{len(chunk):x};chunk-signature={sig}\r\n".encode() + chunk + b"\r\n"
    auth = f"AWS4-HMAC-SHA256 Credential={ACCESS}/{scope}, SignedHeaders={names}, Signature={seed}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    target = f"{path}?{canonical_query}" if canonical_query else path
    request = f"PUT {target} HTTP/1.1\r\n{head}Authorization: {auth}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return raw_request(request.encode() + body, hang_up=False)


def test_aws_chunked_uploads_are_checked_chunk_by_chunk():
    s3 = client()
    b = bucket_name("chunked")
    s3.create_bucket(Bucket=b)
    chunks = [bytes([65 + i]) * 65536 for i in range(3)]
    # Signed right: stored (so a refusal below is the signature's doing).
    answer = chunked_put(f"/{b}/good", chunks)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert s3.get_object(Bucket=b, Key="good")["Body"].read() == b"".join(chunks)
    # A bad signature on any chunk, the last empty one too: refused, nothing stored.
    for i in range(len(chunks) + 1):
        answer = chunked_put(f"/{b}/bad{i}", chunks, corrupt=i)
        assert answer.startswith(b"HTTP/1.1 403") and b"SignatureDoesNotMatch" in answer, (i, answer[:400])
        assert error_code(lambda: s3.head_object(Bucket=b, Key=f"bad{i}")) == "404"
    # A chunk whose bytes changed on the way, its signature right for the bytes signed: refused.
    answer = chunked_put(f"/{b}/tampered", chunks, tamper=1)
    assert answer.startswith(b"HTTP/1.1 403") and b"SignatureDoesNotMatch" in answer, answer[:400]
    assert error_code(lambda: s3.head_object(Bucket=b, Key="tampered")) == "404"
    # Beyond one segment the body streams into the pipeline; the final chunk's signature is still
    # checked before the object is committed.
    big = [os.urandom(4 * MIB) for _ in range(3)]
    answer = chunked_put(f"/{b}/big-bad", big, corrupt=len(big))
    assert answer.startswith(b"HTTP/1.1 403") and b"SignatureDoesNotMatch" in answer, answer[:400]
    assert error_code(lambda: s3.head_object(Bucket=b, Key="big-bad")) == "404"
    # Parts too: one in its turn (streamed) and one ahead of it (spooled); then sent right.
    up = s3.create_multipart_upload(Bucket=b, Key="mp-chunked")["UploadId"]
    for number in (2, 1):
        q = {"partNumber": str(number), "uploadId": up}
        answer = chunked_put(f"/{b}/mp-chunked", big[:2], corrupt=2, query=q)
        assert answer.startswith(b"HTTP/1.1 403") and b"SignatureDoesNotMatch" in answer, (number, answer[:400])
    assert s3.list_parts(Bucket=b, Key="mp-chunked", UploadId=up).get("Parts", []) == []
    for number in (2, 1):
        answer = chunked_put(f"/{b}/mp-chunked", big[:2], query={"partNumber": str(number), "uploadId": up})
        assert answer.startswith(b"HTTP/1.1 200"), (number, answer[:400])
    parts = s3.list_parts(Bucket=b, Key="mp-chunked", UploadId=up)["Parts"]
    s3.complete_multipart_upload(Bucket=b, Key="mp-chunked", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]})
    assert s3.get_object(Bucket=b, Key="mp-chunked")["Body"].read() == b"".join(big[:2]) * 2
    s3.delete_object(Bucket=b, Key="mp-chunked")
    s3.delete_object(Bucket=b, Key="good")
    s3.delete_bucket(Bucket=b)


def archipel(*args):
    """Runs the archipel binary against the devnet (its tenant key, its first node, its gateway)."""
    cmd = [
        os.environ["ARCHIPEL_BIN"], *args,
    ]
    env = dict(os.environ, ARCHIPEL_KEY=os.path.join(DEVNET, "tenant.key"), ARCHIPEL_NODE=os.environ["ARCHIPEL_NODE"],
               ARCHIPEL_GATEWAY=ENDPOINT)
    out = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    assert out.returncode == 0, f"archipel {' '.join(args)}: {out.stderr.decode()}"
    return out.stdout.decode()


def test_export_to_and_import_from_a_third_party_s3_server(tmp_path):
    """No lock-in beyond our own gateway: moto's S3 server (a Python implementation, run here on
    loopback) takes an export and gives it back, with bytes, metadata and ETags."""
    import json
    from moto.server import ThreadedMotoServer

    s3 = client()
    b, b2, b3 = bucket_name("to-moto"), bucket_name("from-moto"), bucket_name("plain-in")
    server = ThreadedMotoServer(ip_address="127.0.94.200", port=26990, verbose=False)
    server.start()
    try:
        other = "http://127.0.94.200:26990"
        there = boto3.client("s3", endpoint_url=other, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                             region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket=b)
        big = big_file(tmp_path, "big.bin", 17 * MIB)
        cfg = boto3.s3.transfer.TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
        s3.upload_file(str(big), b, "media/big.bin", Config=cfg,
                       ExtraArgs={"Metadata": {"k": "v"}, "ContentType": "video/x-test"})
        bodies = {"a": b"file a", "empty": b"", "x/../escape": b"dots", "docs/readme.txt": b"hello"}
        for k, v in bodies.items():
            s3.put_object(Bucket=b, Key=k, Body=v, Metadata={"name": k.replace("/", "_")})
        keys = set(bodies) | {"media/big.bin"}
        to = "s3://backup-moto/archipel"
        sent = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", other, "--json"))
        assert (sent["written"], sent["skipped"]) == (5, 0), sent
        listed = {o["Key"] for o in there.list_objects_v2(Bucket="backup-moto")["Contents"]}
        moved = {k: f"archipel/{k}" for k in keys if k != "x/../escape"}
        moved["x/../escape"] = "archipel/_keys/" + b"x/../escape".hex()
        assert listed == set(moved.values()), listed
        for k, dst in moved.items():
            src_head, dst_head = s3.head_object(Bucket=b, Key=k), there.head_object(Bucket="backup-moto", Key=dst)
            assert there.get_object(Bucket="backup-moto", Key=dst)["Body"].read() == s3.get_object(Bucket=b, Key=k)["Body"].read(), k
            assert dst_head["Metadata"]["archipel-etag"] == src_head["ETag"].strip('"'), (k, dst_head["Metadata"])
            assert {m: v for m, v in dst_head["Metadata"].items() if not m.startswith("archipel-")} == src_head["Metadata"]
        # 17 MiB went in 16 MiB parts: moto computed a multipart ETag of two parts.
        assert there.head_object(Bucket="backup-moto", Key="archipel/media/big.bin")["ETag"].endswith('-2"')
        assert there.head_object(Bucket="backup-moto", Key="archipel/media/big.bin")["ContentType"] == "video/x-test"
        # Resumable against moto too.
        again = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", other, "--json"))
        assert (again["written"], again["skipped"]) == (0, 5), again
        there.delete_object(Bucket="backup-moto", Key="archipel/docs/readme.txt")
        again = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", other, "--json"))
        assert (again["written"], again["skipped"]) == (1, 4), again
        # And back into a new bucket of the devnet: the original ETags (the multipart one too),
        # metadata, content type and bytes.
        back = json.loads(archipel("import", "--from", to, "--endpoint-url", other, "--bucket", b2, "--json"))
        assert (back["imported"], back["skipped"]) == (5, 0), back
        for k in keys:
            src_head, dst_head = s3.head_object(Bucket=b, Key=k), s3.head_object(Bucket=b2, Key=k)
            assert dst_head["ETag"] == src_head["ETag"] and dst_head["Metadata"] == src_head["Metadata"], k
            assert s3.get_object(Bucket=b2, Key=k)["Body"].read() == s3.get_object(Bucket=b, Key=k)["Body"].read(), k
        assert s3.head_object(Bucket=b2, Key="media/big.bin")["ContentType"] == "video/x-test"
        # A bucket moto filled by itself imports as it is.
        there.create_bucket(Bucket="plain-moto")
        there.put_object(Bucket="plain-moto", Key="notes.txt", Body=b"made elsewhere", Metadata={"who": "moto"})
        got = json.loads(archipel("import", "--from", "s3://plain-moto", "--endpoint-url", other, "--bucket", b3, "--json"))
        assert (got["imported"], got["skipped"]) == (1, 0), got
        assert s3.get_object(Bucket=b3, Key="notes.txt")["Body"].read() == b"made elsewhere"
        assert s3.head_object(Bucket=b3, Key="notes.txt")["Metadata"] == {"who": "moto"}
    finally:
        server.stop()
        # The devnet's buckets go, whatever failed above.
        for bucket in (b, b2, b3):
            try:
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
                s3.delete_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError:
                pass  # never made


def test_a_location_constraint_fences_the_bucket():
    s3 = client()
    # The 6-node devnet has 5 nodes in `eu`: a 4+2 bucket fenced there cannot be placed, so it is
    # refused (without the constraint the same bucket is made), and nothing is created.
    b = bucket_name("fenced")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.create_bucket(Bucket=b, CreateBucketConfiguration={"LocationConstraint": "eu"})
    assert "regions [eu]" in e.value.response["Error"]["Message"], e.value.response["Error"]
    assert error_code(lambda: s3.head_bucket(Bucket=b)) in ("404", "NoSuchBucket")
    bad = {"LocationConstraint": "Atlantis!"}
    assert error_code(lambda: s3.create_bucket(Bucket=b, CreateBucketConfiguration=bad)) == "InvalidLocationConstraint"
    # S3's own default region means no fence: the gateway's default policy, as `archipel bucket show` says.
    s3.create_bucket(Bucket=b, CreateBucketConfiguration={"LocationConstraint": "us-east-1"})
    import json
    shown = json.loads(archipel("bucket", "show", b, "--json"))
    assert shown["name"] == b and not shown["policy"].get("regions"), shown
    s3.delete_bucket(Bucket=b)


def new_key(*scope):
    import json
    creds = json.loads(archipel("s3", "keys", "create", "--json", *scope))
    return creds["access_key_id"], creds["secret_access_key"], creds["token"]


def denied(fn):
    assert error_code(fn) == "AccessDenied"


def test_scoped_keys_expire_are_revoked_and_stay_in_scope():
    import json
    root = client()
    b, other = bucket_name("scoped"), bucket_name("other")
    root.create_bucket(Bucket=b)
    root.create_bucket(Bucket=other)
    root.put_object(Bucket=b, Key="team/a.txt", Body=b"team a")
    root.put_object(Bucket=b, Key="private/p.txt", Body=b"private")
    root.put_object(Bucket=other, Key="team/o.txt", Body=b"other")

    # Read-only on b/team/: reads and lists inside; writes, other prefixes, other buckets denied.
    ak, sk, token = new_key("--bucket", b, "--prefix", "team/", "--read-only", "--expires", "1h")
    ro = client(ak, sk)
    assert ro.get_object(Bucket=b, Key="team/a.txt")["Body"].read() == b"team a"
    assert [o["Key"] for o in ro.list_objects_v2(Bucket=b, Prefix="team/")["Contents"]] == ["team/a.txt"]
    ro.head_bucket(Bucket=b)                                                                       # its bucket exists
    assert error_code(lambda: ro.head_bucket(Bucket=other)) == "403"                              # bucket (HEAD: no body)
    denied(lambda: ro.put_object(Bucket=b, Key="team/new.txt", Body=b"x"))                       # action
    denied(lambda: ro.delete_object(Bucket=b, Key="team/a.txt"))                                 # action
    denied(lambda: ro.get_object(Bucket=b, Key="private/p.txt"))                                  # prefix
    denied(lambda: ro.list_objects_v2(Bucket=b))                                                  # prefix (listing)
    denied(lambda: ro.copy_object(Bucket=b, Key="team/c.txt", CopySource=f"{b}/private/p.txt"))  # prefix (copy source)
    denied(lambda: ro.get_object(Bucket=other, Key="team/o.txt"))                                 # bucket
    denied(lambda: ro.create_bucket(Bucket=bucket_name("nope")))                                  # admin
    assert error_code(lambda: root.head_object(Bucket=b, Key="team/new.txt")) == "404"
    # Dot segments are part of a key, never a way out of a prefix: `team/../private/p.txt` is its
    # own (absent) key, not private/p.txt.
    assert error_code(lambda: ro.get_object(Bucket=b, Key="team/../private/p.txt")) == "NoSuchKey"
    root.put_object(Bucket=b, Key="x/../team/a.txt", Body=b"dots")
    assert root.get_object(Bucket=b, Key="x/../team/a.txt")["Body"].read() == b"dots"
    assert root.get_object(Bucket=b, Key="team/a.txt")["Body"].read() == b"team a"

    # Read-write on b/team/ hands on a read-only attenuation of itself to team/sub/.
    ak2, sk2, token2 = new_key("--bucket", b, "--prefix", "team/")
    rw = client(ak2, sk2)
    rw.put_object(Bucket=b, Key="team/sub/w.txt", Body=b"written")
    denied(lambda: rw.put_object(Bucket=b, Key="elsewhere.txt", Body=b"x"))
    denied(lambda: rw.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "team/sub/w.txt"}, {"Key": "private/p.txt"}]}))
    denied(lambda: rw.copy_object(Bucket=b, Key="team/c.txt", CopySource=f"{b}/private/p.txt"))       # copy source
    denied(lambda: rw.copy_object(Bucket=b, Key="team/c.txt", CopySource=f"{other}/team/o.txt"))      # source bucket
    rw.copy_object(Bucket=b, Key="team/c.txt", CopySource=f"{b}/team/a.txt")
    denied(lambda: rw.create_multipart_upload(Bucket=b, Key="private/mp.bin"))
    denied(lambda: rw.list_multipart_uploads(Bucket=b))
    narrow = archipel("s3", "keys", "attenuate", token2, "--prefix", "team/sub/", "--read-only").strip()
    creds = json.loads(archipel("s3", "keys", "register", narrow, "--json"))
    sub = client(creds["access_key_id"], creds["secret_access_key"])
    assert sub.get_object(Bucket=b, Key="team/sub/w.txt")["Body"].read() == b"written"
    denied(lambda: sub.get_object(Bucket=b, Key="team/a.txt"))
    denied(lambda: sub.put_object(Bucket=b, Key="team/sub/x.txt", Body=b"x"))

    # Expired.
    ak3, sk3, _ = new_key("--bucket", b, "--expires", "4s")
    assert client(ak3, sk3).get_object(Bucket=b, Key="team/a.txt")["Body"].read() == b"team a"
    time.sleep(5.1)
    denied(lambda: client(ak3, sk3).get_object(Bucket=b, Key="team/a.txt"))

    # Revoked on the ledger: the key and the token attenuated from it are refused within seconds;
    # the read-only key minted separately is not.
    archipel("s3", "keys", "revoke", token2)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            rw.get_object(Bucket=b, Key="team/sub/w.txt")
            time.sleep(0.3)
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "AccessDenied"
            break
    else:
        raise AssertionError("a revoked key still works 10 s after its revocation was final")
    denied(lambda: sub.get_object(Bucket=b, Key="team/sub/w.txt"))
    assert ro.get_object(Bucket=b, Key="team/a.txt")["Body"].read() == b"team a"
    # A revoked token is not registered again; a forged one never.
    out = subprocess.run([os.environ["ARCHIPEL_BIN"], "s3", "keys", "register", token2, "--gateway", ENDPOINT], capture_output=True)
    assert out.returncode != 0 and b"revoked" in out.stderr, out.stderr
    out = subprocess.run([os.environ["ARCHIPEL_BIN"], "s3", "keys", "register", token[:-8] + "AAAAAAAA", "--gateway", ENDPOINT], capture_output=True)
    assert out.returncode != 0, out.stdout

    for bucket in (b, other):
        keys = [o["Key"] for o in root.list_objects_v2(Bucket=bucket).get("Contents", [])]
        root.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
        root.delete_bucket(Bucket=bucket)


def test_export_and_import_move_everything_with_metadata_resumably(tmp_path):
    import json
    s3 = client()
    b = bucket_name("export")
    s3.create_bucket(Bucket=b)
    big = big_file(tmp_path, "big.bin", 17 * MIB)
    cfg = boto3.s3.transfer.TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    s3.upload_file(str(big), b, "media/big.bin", Config=cfg, ExtraArgs={"Metadata": {"k": "v"}, "ContentType": "video/x-test"})
    bodies = {"a": b"file a", "a/b": b"nested under a", "x/../escape": b"dots stay in the export", "docs/readme.txt": b"hello"}
    for k, v in bodies.items():
        s3.put_object(Bucket=b, Key=k, Body=v, Metadata={"name": k.replace("/", "_")})
    out = tmp_path / "export"
    first = json.loads(archipel("export", "--bucket", b, "--to", str(out), "--json"))
    assert (first["written"], first["skipped"]) == (5, 0)
    index = json.loads((out / "archipel-export.json").read_text())
    files = {o["key"]: o for o in index["objects"]}
    assert set(files) == set(bodies) | {"media/big.bin"}
    assert (out / "media/big.bin").read_bytes() == big.read_bytes()
    assert (out / "docs/readme.txt").read_bytes() == b"hello"
    for k, v in bodies.items():
        assert (out / files[k]["file"]).read_bytes() == v
        # Nothing is written outside the export directory.
        assert os.path.realpath(out / files[k]["file"]).startswith(os.path.realpath(out))
    assert files["media/big.bin"]["meta"]["user"] == {"k": "v"}
    assert files["media/big.bin"]["etag"].endswith("-3")
    # Resumable: again, nothing to do; a lost file is written again.
    again = json.loads(archipel("export", "--bucket", b, "--to", str(out), "--json"))
    assert (again["written"], again["skipped"]) == (0, 5)
    (out / "docs/readme.txt").unlink()
    again = json.loads(archipel("export", "--bucket", b, "--to", str(out), "--json"))
    assert (again["written"], again["skipped"]) == (1, 4)
    # Import into another bucket: same bytes, metadata and ETags; again, nothing to do.
    b2 = bucket_name("imported")
    imported = json.loads(archipel("import", "--from", str(out), "--bucket", b2, "--json"))
    assert (imported["imported"], imported["skipped"]) == (5, 0)
    for k in list(bodies) + ["media/big.bin"]:
        src, dst = s3.head_object(Bucket=b, Key=k), s3.head_object(Bucket=b2, Key=k)
        assert dst["ETag"] == src["ETag"] and dst["Metadata"] == src["Metadata"], k
        assert s3.get_object(Bucket=b2, Key=k)["Body"].read() == s3.get_object(Bucket=b, Key=k)["Body"].read()
    assert s3.head_object(Bucket=b2, Key="media/big.bin")["ContentType"] == "video/x-test"
    again = json.loads(archipel("import", "--from", str(out), "--bucket", b2, "--json"))
    assert (again["imported"], again["skipped"]) == (0, 5)
    # To another S3 endpoint (here the devnet's gateway itself, a bucket it does not have yet):
    # same bytes, content headers and metadata, the key `..` cannot carry under `_keys/`; resumable.
    b3 = bucket_name("s3-export")
    to = f"s3://{b3}/backup"
    sent = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", ENDPOINT, "--json"))
    assert (sent["written"], sent["skipped"]) == (5, 0)
    there = {o["Key"] for o in s3.list_objects_v2(Bucket=b3)["Contents"]}
    moved = {k: f"backup/{k}" for k in ("a", "a/b", "docs/readme.txt", "media/big.bin")}
    moved["x/../escape"] = "backup/_keys/" + b"x/../escape".hex()
    assert there == set(moved.values())
    for k, dst in moved.items():
        src_head, dst_head = s3.head_object(Bucket=b, Key=k), s3.head_object(Bucket=b3, Key=dst)
        assert s3.get_object(Bucket=b3, Key=dst)["Body"].read() == s3.get_object(Bucket=b, Key=k)["Body"].read(), k
        assert dst_head["Metadata"]["archipel-etag"] == src_head["ETag"].strip('"')
        assert {m: v for m, v in dst_head["Metadata"].items() if not m.startswith("archipel-")} == src_head["Metadata"]
    # 17 MiB goes in parts (16 MiB at most each): the ETag there is of two parts.
    assert s3.head_object(Bucket=b3, Key="backup/media/big.bin")["ETag"].endswith('-2"')
    assert s3.head_object(Bucket=b3, Key="backup/media/big.bin")["ContentType"] == "video/x-test"
    again = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", ENDPOINT, "--json"))
    assert (again["written"], again["skipped"]) == (0, 5)
    s3.delete_object(Bucket=b3, Key="backup/a")
    again = json.loads(archipel("export", "--bucket", b, "--to", to, "--endpoint-url", ENDPOINT, "--json"))
    assert (again["written"], again["skipped"]) == (1, 4)
    # And back from there into a new bucket: same bytes, ETags (the multipart one kept) and metadata.
    b4 = bucket_name("s3-import")
    back = json.loads(archipel("import", "--from", to, "--endpoint-url", ENDPOINT, "--bucket", b4, "--json"))
    assert (back["imported"], back["skipped"]) == (5, 0)
    for k in moved:
        src_head, dst_head = s3.head_object(Bucket=b, Key=k), s3.head_object(Bucket=b4, Key=k)
        assert dst_head["ETag"] == src_head["ETag"] and dst_head["Metadata"] == src_head["Metadata"], k
        assert s3.get_object(Bucket=b4, Key=k)["Body"].read() == s3.get_object(Bucket=b, Key=k)["Body"].read(), k
    assert s3.head_object(Bucket=b4, Key="media/big.bin")["ContentType"] == "video/x-test"
    again = json.loads(archipel("import", "--from", to, "--endpoint-url", ENDPOINT, "--bucket", b4, "--json"))
    assert (again["imported"], again["skipped"]) == (0, 5)
    # Objects archipel did not export (no archipel metadata, a key under `_keys/` that is no hex):
    # imported as they are, their ETags kept; a run again finds them.
    b5 = bucket_name("foreign")
    s3.create_bucket(Bucket=b5)
    s3.put_object(Bucket=b5, Key="plain.txt", Body=b"from elsewhere", ContentType="text/plain", Metadata={"who": "them"})
    s3.put_object(Bucket=b5, Key="_keys/not-hex", Body=b"odd key")
    b6 = bucket_name("foreign-in")
    got = json.loads(archipel("import", "--from", f"s3://{b5}", "--endpoint-url", ENDPOINT, "--bucket", b6, "--json"))
    assert (got["imported"], got["skipped"]) == (2, 0)
    for k in ("plain.txt", "_keys/not-hex"):
        assert s3.get_object(Bucket=b6, Key=k)["Body"].read() == s3.get_object(Bucket=b5, Key=k)["Body"].read()
        assert s3.head_object(Bucket=b6, Key=k)["ETag"] == s3.head_object(Bucket=b5, Key=k)["ETag"]
    assert s3.head_object(Bucket=b6, Key="plain.txt")["Metadata"] == {"who": "them"}
    assert s3.head_object(Bucket=b6, Key="plain.txt")["ContentType"] == "text/plain"
    again = json.loads(archipel("import", "--from", f"s3://{b5}", "--endpoint-url", ENDPOINT, "--bucket", b6, "--json"))
    assert (again["imported"], again["skipped"]) == (0, 2)
    # Wrong credentials at the target: a clear error, not a crash.
    refused = subprocess.run([os.environ["ARCHIPEL_BIN"], "export", "--bucket", b, "--to", to, "--endpoint-url", ENDPOINT],
                             capture_output=True, env=dict(os.environ, ARCHIPEL_KEY=os.path.join(DEVNET, "tenant.key"),
                                                           AWS_SECRET_ACCESS_KEY="wrong" * 8))
    assert refused.returncode != 0 and b"SignatureDoesNotMatch" in refused.stderr, refused.stderr
    # An edited file of the same size does not match its ETag: refused, nothing imported under it.
    (out / "docs/readme.txt").write_bytes(b"HELLO")
    edited = subprocess.run([os.environ["ARCHIPEL_BIN"], "import", "--from", str(out), "--bucket", bucket_name("edit")],
                            capture_output=True, env=dict(os.environ, ARCHIPEL_KEY=os.path.join(DEVNET, "tenant.key")))
    assert edited.returncode != 0 and b"MD5" in edited.stderr, edited.stderr
    (out / "docs/readme.txt").write_bytes(b"hello")
    # A damaged export is refused, naming the file.
    (out / "a").write_bytes(b"short")
    bad = subprocess.run([os.environ["ARCHIPEL_BIN"], "import", "--from", str(out), "--bucket", bucket_name("bad")],
                         capture_output=True, env=dict(os.environ, ARCHIPEL_KEY=os.path.join(DEVNET, "tenant.key")))
    assert bad.returncode != 0 and b"damaged" in bad.stderr, bad.stderr
    for bucket in (b, b2, b3, b4, b5, b6):
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
        s3.delete_bucket(Bucket=bucket)
