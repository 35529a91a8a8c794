#!/usr/bin/env python3
"""boto3 against a running sov cluster: every S3 operation the gateway serves, its error codes
and listing edge cases. Reads S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, SOV_BIN and
SOV_METAD (and AWS_CA_BUNDLE for HTTPS, SOV_TLS_DIR for sov) from the environment. Prints one line per check; exits 1 on the first failure."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import ssl
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import boto3
from botocore.client import Config
from botocore.exceptions import ClientError

EP = os.environ["S3_ENDPOINT"]
# HTTPS: trust the cluster CA (boto3 reads AWS_CA_BUNDLE itself).
CTX = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))


def urlopen(req):
    return urllib.request.urlopen(req, context=CTX)


AK = os.environ["AWS_ACCESS_KEY_ID"]
SK = os.environ["AWS_SECRET_ACCESS_KEY"]
SOV = os.environ["SOV_BIN"]
METAD = os.environ["SOV_METAD"]
CHECKS = 0


def client(ak=AK, sk=SK, **cfg):
    return boto3.client(
        "s3",
        endpoint_url=EP,
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **cfg),
    )


s3 = client()


def ok(name):
    global CHECKS
    CHECKS += 1
    print(f"PASS {name}", flush=True)


def expect_error(name, code, fn, status=None):
    try:
        fn()
    except ClientError as e:
        got = e.response["Error"]["Code"]
        st = e.response["ResponseMetadata"]["HTTPStatusCode"]
        if got != code and str(st) != code:
            raise AssertionError(f"{name}: expected {code}, got {got} ({st}): {e}")
        if status is not None and st != status:
            raise AssertionError(f"{name}: expected HTTP {status}, got {st}")
        ok(name)
        return
    raise AssertionError(f"{name}: expected {code}, the call succeeded")


def eq(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    ok(name)


def sov(*args):
    out = subprocess.run([SOV, "--output", "json", *args, "--metad", METAD],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"sov {args}: {out.stderr}")
    return json.loads(out.stdout)


def main():
    b = "boto-suite"
    # Buckets.
    s3.create_bucket(Bucket=b)
    ok("create_bucket")
    expect_error("create_bucket again", "BucketAlreadyOwnedByYou", lambda: s3.create_bucket(Bucket=b), 409)
    expect_error("bad bucket name", "InvalidBucketName", lambda: s3.create_bucket(Bucket="Bad_Name"))
    s3.head_bucket(Bucket=b)
    ok("head_bucket")
    expect_error("head missing bucket", "404", lambda: s3.head_bucket(Bucket="no-such-bucket-x"))
    eq("list_buckets", b in [x["Name"] for x in s3.list_buckets()["Buckets"]], True)
    loc = s3.get_bucket_location(Bucket=b)
    eq("get_bucket_location", loc.get("LocationConstraint"), None)

    # Objects.
    body = os.urandom(100_000)
    r = s3.put_object(Bucket=b, Key="obj", Body=body, ContentType="text/plain",
                      Metadata={"color": "blue", "Mixed-Case": "v"})
    eq("put etag is md5", r["ETag"].strip('"'), hashlib.md5(body).hexdigest())
    eq("put says AES256", r.get("ServerSideEncryption"), "AES256")
    g = s3.get_object(Bucket=b, Key="obj")
    eq("get body", g["Body"].read(), body)
    eq("get content type", g["ContentType"], "text/plain")
    eq("get metadata", g["Metadata"], {"color": "blue", "mixed-case": "v"})
    eq("get sse", g.get("ServerSideEncryption"), "AES256")
    h = s3.head_object(Bucket=b, Key="obj")
    eq("head length", h["ContentLength"], len(body))
    eq("range first", s3.get_object(Bucket=b, Key="obj", Range="bytes=0-4")["Body"].read(), body[:5])
    eq("range suffix", s3.get_object(Bucket=b, Key="obj", Range="bytes=-3")["Body"].read(), body[-3:])
    eq("range open", s3.get_object(Bucket=b, Key="obj", Range="bytes=99990-")["Body"].read(), body[99990:])
    rr = s3.get_object(Bucket=b, Key="obj", Range="bytes=10-19")
    eq("range content-range", rr["ContentRange"], f"bytes 10-19/{len(body)}")
    expect_error("range past the end", "InvalidRange", lambda: s3.get_object(Bucket=b, Key="obj", Range="bytes=200000-"), 416)
    expect_error("get missing key", "NoSuchKey", lambda: s3.get_object(Bucket=b, Key="nope"), 404)
    expect_error("get missing bucket", "NoSuchBucket", lambda: s3.get_object(Bucket="no-such-bucket-x", Key="k"), 404)
    s3.put_object(Bucket=b, Key="empty", Body=b"")
    eq("empty object", s3.get_object(Bucket=b, Key="empty")["Body"].read(), b"")
    # A 0-byte PUT, then PUTs with a body on the same pooled connection: botocore keeps the
    # status it read during "Expect: 100-continue" unless the gateway closes that connection,
    # and the next PUT then waits for its read timeout (found by chaos/).
    quick = client(read_timeout=5)
    for i in range(3):
        t = time.time()
        quick.put_object(Bucket=b, Key=f"after-empty-{i}", Body=b"")
        quick.put_object(Bucket=b, Key=f"after-empty-{i}", Body=b"x" * (i + 1))
        if time.time() - t > 4:
            raise AssertionError(f"PUT after a 0-byte PUT took {time.time() - t:.1f}s")
    eq("PUT after a 0-byte PUT", quick.get_object(Bucket=b, Key="after-empty-2")["Body"].read(), b"xxx")
    big = os.urandom(9 * 1024 * 1024 + 5)
    s3.put_object(Bucket=b, Key="big", Body=big)
    eq("9 MiB object round trip", s3.get_object(Bucket=b, Key="big")["Body"].read(), big)
    eq("range across chunks", s3.get_object(Bucket=b, Key="big", Range="bytes=4194300-4194310")["Body"].read(), big[4194300:4194311])

    # Integrity.
    bad_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    expect_error("wrong Content-MD5", "BadDigest", lambda: s3.put_object(Bucket=b, Key="md5", Body=b"data", ContentMD5=bad_md5))
    good_md5 = base64.b64encode(hashlib.md5(b"data").digest()).decode()
    s3.put_object(Bucket=b, Key="md5", Body=b"data", ContentMD5=good_md5)
    ok("right Content-MD5")
    for alg in ["CRC32", "SHA1", "SHA256"]:  # CRC32C and CRC64NVME need awscrt
        r = s3.put_object(Bucket=b, Key=f"sum-{alg}", Body=b"checksummed", ChecksumAlgorithm=alg)
        eq(f"checksum {alg} echoed", bool(r.get(f"Checksum{alg}")), True)
    expect_error("wrong SHA256 checksum", "BadDigest", lambda: s3.put_object(
        Bucket=b, Key="sum-bad", Body=b"checksummed",
        ChecksumSHA256=base64.b64encode(hashlib.sha256(b"x").digest()).decode()))

    # Conditionals.
    etag = h["ETag"]
    s3.get_object(Bucket=b, Key="obj", IfMatch=etag)
    ok("If-Match right")
    expect_error("If-Match wrong", "PreconditionFailed", lambda: s3.get_object(Bucket=b, Key="obj", IfMatch='"0000"'), 412)
    expect_error("If-None-Match same", "304", lambda: s3.get_object(Bucket=b, Key="obj", IfNoneMatch=etag), 304)
    future = datetime.now(timezone.utc) + timedelta(days=1)
    past = datetime.now(timezone.utc) - timedelta(days=1)
    expect_error("If-Modified-Since future", "304", lambda: s3.get_object(Bucket=b, Key="obj", IfModifiedSince=future), 304)
    expect_error("If-Unmodified-Since past", "PreconditionFailed", lambda: s3.get_object(Bucket=b, Key="obj", IfUnmodifiedSince=past), 412)
    s3.get_object(Bucket=b, Key="obj", IfModifiedSince=past)
    ok("If-Modified-Since past")

    # Copy.
    s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "obj"})
    c = s3.get_object(Bucket=b, Key="copy")
    eq("copy body", c["Body"].read(), body)
    eq("copy keeps metadata", c["Metadata"], {"color": "blue", "mixed-case": "v"})
    s3.copy_object(Bucket=b, Key="copy2", CopySource={"Bucket": b, "Key": "obj"},
                   MetadataDirective="REPLACE", Metadata={"new": "1"}, ContentType="x/y")
    c2 = s3.head_object(Bucket=b, Key="copy2")
    eq("copy REPLACE metadata", c2["Metadata"], {"new": "1"})
    eq("copy REPLACE content type", c2["ContentType"], "x/y")
    expect_error("copy onto itself", "InvalidRequest", lambda: s3.copy_object(Bucket=b, Key="obj", CopySource={"Bucket": b, "Key": "obj"}))
    expect_error("copy if-match wrong", "PreconditionFailed", lambda: s3.copy_object(
        Bucket=b, Key="copy3", CopySource={"Bucket": b, "Key": "obj"}, CopySourceIfMatch='"0000"'))

    # Listing.
    keys = [f"list/{i:02d}" for i in range(25)] + ["list/dir/a", "list/dir/b", "list/ünïcode ké", "list/sp ace+plus"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=k.encode())
    seen, token = [], None
    while True:
        kw = {"Bucket": b, "Prefix": "list/", "MaxKeys": 7}
        if token:
            kw["ContinuationToken"] = token
        p = s3.list_objects_v2(**kw)
        seen += [o["Key"] for o in p.get("Contents", [])]
        if not p["IsTruncated"]:
            break
        token = p["NextContinuationToken"]
    eq("v2 pages in order", seen, sorted(keys, key=lambda k: k.encode()))
    p = s3.list_objects_v2(Bucket=b, Prefix="list/", Delimiter="/")
    eq("v2 common prefixes", [c["Prefix"] for c in p.get("CommonPrefixes", [])], ["list/dir/"])
    p = s3.list_objects_v2(Bucket=b, Prefix="list/", StartAfter="list/20")
    eq("v2 start-after", p["Contents"][0]["Key"], "list/21")
    p = s3.list_objects_v2(Bucket=b, Prefix="list/ü", EncodingType="url")
    eq("v2 encoding-type url", p["Contents"][0]["Key"], "list/%C3%BCn%C3%AFcode%20k%C3%A9")
    seen, marker = [], ""
    while True:
        p = s3.list_objects(Bucket=b, Prefix="list/", Marker=marker, MaxKeys=10)
        got = [o["Key"] for o in p.get("Contents", [])]
        seen += got
        if not p["IsTruncated"]:
            break
        marker = p.get("NextMarker", got[-1])
    eq("v1 pages in order", seen, sorted(keys, key=lambda k: k.encode()))
    v = s3.list_object_versions(Bucket=b, Prefix="list/0")
    eq("versions are null", {x["VersionId"] for x in v["Versions"]}, {"null"})
    eq("max-keys 0", s3.list_objects_v2(Bucket=b, MaxKeys=0).get("KeyCount"), 0)

    # Multipart.
    part = os.urandom(5 * 1024 * 1024)
    tail = os.urandom(1000)
    up = s3.create_multipart_upload(Bucket=b, Key="mp", Metadata={"m": "1"})["UploadId"]
    e1 = s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=1, Body=part)["ETag"]
    e2 = s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=2, Body=tail)["ETag"]
    lp = s3.list_parts(Bucket=b, Key="mp", UploadId=up)
    eq("list_parts", [(p["PartNumber"], p["Size"]) for p in lp["Parts"]], [(1, len(part)), (2, len(tail))])
    lu = s3.list_multipart_uploads(Bucket=b)
    eq("list_multipart_uploads", [u["UploadId"] for u in lu.get("Uploads", [])], [up])
    expect_error("parts out of order", "InvalidPartOrder", lambda: s3.complete_multipart_upload(
        Bucket=b, Key="mp", UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]}))
    expect_error("wrong part etag", "InvalidPart", lambda: s3.complete_multipart_upload(
        Bucket=b, Key="mp", UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]}))
    r = s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    want = hashlib.md5(hashlib.md5(part).digest() + hashlib.md5(tail).digest()).hexdigest() + "-2"
    eq("multipart etag", r["ETag"].strip('"'), want)
    mp = s3.get_object(Bucket=b, Key="mp")
    eq("multipart body", mp["Body"].read(), part + tail)
    eq("multipart metadata", mp["Metadata"], {"m": "1"})
    eq("multipart range across parts", s3.get_object(Bucket=b, Key="mp", Range=f"bytes={len(part)-2}-{len(part)+1}")["Body"].read(), (part + tail)[len(part)-2:len(part)+2])
    up2 = s3.create_multipart_upload(Bucket=b, Key="small")["UploadId"]
    f1 = s3.upload_part(Bucket=b, Key="small", UploadId=up2, PartNumber=1, Body=b"tiny")["ETag"]
    f2 = s3.upload_part(Bucket=b, Key="small", UploadId=up2, PartNumber=2, Body=b"tiny")["ETag"]
    expect_error("part too small", "EntityTooSmall", lambda: s3.complete_multipart_upload(
        Bucket=b, Key="small", UploadId=up2,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": f1}, {"PartNumber": 2, "ETag": f2}]}))
    s3.abort_multipart_upload(Bucket=b, Key="small", UploadId=up2)
    ok("abort")
    expect_error("parts of an aborted upload", "NoSuchUpload", lambda: s3.list_parts(Bucket=b, Key="small", UploadId=up2), 404)
    up3 = s3.create_multipart_upload(Bucket=b, Key="pcopy")["UploadId"]
    pc = s3.upload_part_copy(Bucket=b, Key="pcopy", UploadId=up3, PartNumber=1,
                             CopySource={"Bucket": b, "Key": "big"}, CopySourceRange="bytes=0-5242879")
    pe = pc["CopyPartResult"]["ETag"]
    s3.complete_multipart_upload(Bucket=b, Key="pcopy", UploadId=up3, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": pe}]})
    eq("upload_part_copy", s3.get_object(Bucket=b, Key="pcopy")["Body"].read(), big[:5242880])

    # Deletes.
    s3.delete_object(Bucket=b, Key="copy2")
    expect_error("deleted object", "NoSuchKey", lambda: s3.get_object(Bucket=b, Key="copy2"))
    s3.delete_object(Bucket=b, Key="never-existed")
    ok("delete of a missing key is fine")
    r = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in keys]})
    eq("delete_objects", len(r.get("Deleted", [])), len(keys))
    eq("listing after delete_objects", s3.list_objects_v2(Bucket=b, Prefix="list/").get("KeyCount"), 0)
    expect_error("delete non-empty bucket", "BucketNotEmpty", lambda: s3.delete_bucket(Bucket=b), 409)

    # Credentials, presigned URLs, anonymous access, permissions.
    expect_error("wrong secret", "SignatureDoesNotMatch", lambda: client(AK, SK + "x").list_buckets(), 403)
    expect_error("unknown key", "InvalidAccessKeyId", lambda: client("SOVNOSUCHKEY00000000", SK).list_buckets(), 403)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "obj"}, ExpiresIn=60)
    eq("presigned GET", urlopen(url).read(), body)
    short = s3.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "obj"}, ExpiresIn=1)
    time.sleep(2.5)
    try:
        urlopen(short)
        raise AssertionError("an expired presigned URL worked")
    except urllib.error.HTTPError as e:
        eq("expired presigned URL refused", e.code, 403)
    anon = f"{EP}/{b}/obj"
    try:
        urlopen(anon)
        raise AssertionError("an anonymous GET worked on a private bucket")
    except urllib.error.HTTPError as e:
        eq("anonymous GET refused", e.code, 403)
    sov("bucket", "public", b, "on")
    time.sleep(2.5)  # the gateway caches bucket settings for 2 s
    eq("anonymous GET of a public bucket", urlopen(anon).read(), body)
    req = urllib.request.Request(f"{EP}/{b}/anon-put", data=b"x", method="PUT")
    try:
        urlopen(req)
        raise AssertionError("an anonymous PUT worked")
    except urllib.error.HTTPError as e:
        eq("anonymous PUT refused on a public bucket", e.code, 403)
    sov("bucket", "public", b, "off")
    time.sleep(2.5)
    k = sov("key", "create", "--name", "reader")
    other = client(k["access_key"], k["secret_key"])
    expect_error("no grant: read denied", "AccessDenied", lambda: other.get_object(Bucket=b, Key="obj"), 403)
    sov("bucket", "grant", b, k["access_key"], "read")
    time.sleep(2.5)
    eq("read grant: get", other.get_object(Bucket=b, Key="obj")["Body"].read(), body)
    expect_error("read grant: put denied", "AccessDenied", lambda: other.put_object(Bucket=b, Key="w", Body=b"w"), 403)
    sov("bucket", "grant", b, k["access_key"], "write")
    time.sleep(2.5)
    other.put_object(Bucket=b, Key="w", Body=b"w")
    ok("write grant: put")
    expect_error("write grant: delete bucket denied", "AccessDenied", lambda: other.delete_bucket(Bucket=b), 403)

    # Clean up: empty and delete the bucket.
    for o in s3.list_objects_v2(Bucket=b).get("Contents", []):
        s3.delete_object(Bucket=b, Key=o["Key"])
    s3.delete_bucket(Bucket=b)
    expect_error("bucket gone", "404", lambda: s3.head_bucket(Bucket=b))
    print(f"boto3 suite: {CHECKS} checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL {e}", flush=True)
        sys.exit(1)
