//! The S3 gateway: what it parses and checks beyond `s3s` (`s3_request`), and raw HTTP/1.1
//! request bytes through the whole service, s3s included, with metad out of reach
//! (`s3_http`).

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use gateway_s3::metrics::Metrics;
use gateway_s3::s3::Pools;
use gateway_s3::s3::fuzzing::{self, Checks};
use s3s::dto::{ChecksumAlgorithm, CopySource, ETagCondition, Range, Timestamp, TimestampFormat};
use s3s::service::S3Service;
use sov_client::meta::MetaClient;
use sov_client::{Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::rt::{Input, paused};

const ALGORITHMS: [&str; 5] = ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"];

/// Newline-separated fields after an 8-byte object size: a Range header, a copy source range,
/// a key, an operation name, Content-MD5, a checksum algorithm and value, a trailer value,
/// If-Match, If-None-Match, two HTTP dates, a copy source; the rest is a body. Ranges stay
/// inside the object, keys encode reversibly, and a body passes the checks made from its own
/// digests.
pub fn s3_request(data: &[u8]) {
    let mut inp = Input(data);
    let size = inp.u64();
    let rest = inp.rest();
    let mut fields = rest.splitn(14, |b| *b == b'\n');
    let mut field = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let range = field();
    let copy_range = field();
    let key = field();
    let op = field();
    let content_md5 = field();
    let algorithm = field();
    let value = field();
    let trailer = field();
    let if_match = field();
    let if_none_match = field();
    let since = field();
    let unmodified_since = field();
    let copy_source = field();
    let body = fields.next().unwrap_or_default();

    for sz in [0, 1, size, u64::MAX] {
        ranges(&range, &copy_range, sz);
    }
    let encoded = fuzzing::enc(&key, true);
    assert_eq!(
        urlencoding::decode(&encoded).ok().as_deref(),
        Some(key.as_str()),
        "url-encoded key does not decode back"
    );
    assert_eq!(fuzzing::enc(&key, false), key);
    let _ = gateway_s3::auth::need(&op);
    let _ = CopySource::parse(&copy_source);

    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let algorithm = opt(&algorithm).map(ChecksumAlgorithm::from);
    let mut sums: [Option<String>; 5] = Default::default();
    if !value.is_empty() {
        sums[(size % 5) as usize] = Some(value.clone());
    }
    let trailers = opt(&trailer).and_then(|t| {
        let alg = algorithm.as_ref()?.as_str().to_ascii_lowercase();
        let name = http::HeaderName::from_bytes(format!("x-amz-checksum-{alg}").as_bytes()).ok()?;
        let mut h = http::HeaderMap::new();
        h.insert(name, http::HeaderValue::from_str(&t).ok()?);
        Some(h)
    });
    let _ = fuzzing::check_body(
        body,
        Checks {
            content_md5: opt(&content_md5),
            algorithm: algorithm.clone(),
            sums,
            trailers,
        },
    );
    body_checks(body, algorithm);

    let etag = |s: &str| ETagCondition::parse_http_header(s.as_bytes()).ok();
    let date = |s: &str| Timestamp::parse(TimestampFormat::HttpDate, s).ok();
    let _ = fuzzing::check_read_conditions(
        &key,
        size,
        &etag(&if_match),
        &etag(&if_none_match),
        &date(&since),
        &date(&unmodified_since),
    );
}

/// GET/HEAD ranges and copy source ranges against an object of `size`.
fn ranges(range: &str, copy_range: &str, size: u64) {
    assert_eq!(
        fuzzing::byte_range(&None, size).ok(),
        Some((0, size, None)),
        "no Range is the whole object"
    );
    if let Ok(r) = Range::parse(range)
        && let Ok((start, end, content_range)) = fuzzing::byte_range(&Some(r), size)
    {
        assert!(
            start <= end && end <= size,
            "{range:?} of {size}: {start}..{end}"
        );
        match content_range {
            Some(cr) => {
                assert!(start < end);
                assert_eq!(cr, format!("bytes {start}-{}/{size}", end - 1));
            }
            None => assert!(start == end, "{range:?} of {size}: no Content-Range"),
        }
    }
    assert_eq!(fuzzing::copy_source_range(None, size).ok(), Some(None));
    if let Ok(r) = fuzzing::copy_source_range(Some(copy_range), size) {
        let (s, e) = r.expect("a range was given");
        assert!(s < e && e <= size, "{copy_range:?} of {size}: {s}..{e}");
    }
}

/// A body checked against its own MD5 and checksum must pass, and give the same checksum.
fn body_checks(body: &[u8], algorithm: Option<ChecksumAlgorithm>) {
    let none = || Checks {
        content_md5: None,
        algorithm: algorithm.clone(),
        sums: Default::default(),
        trailers: None,
    };
    let (md5_hex, sum) =
        fuzzing::check_body(body, none()).expect("a body with nothing to check against failed");
    let md5 = hex::decode(&md5_hex).expect("hex");
    let mut own = none();
    own.content_md5 = Some(B64.encode(&md5));
    if let Some((alg, v)) = &sum {
        let i = ALGORITHMS
            .iter()
            .position(|a| a == alg)
            .expect("a known algorithm");
        own.sums[i] = Some(v.clone());
    }
    let again = fuzzing::check_body(body, own).expect("a body failed its own digests");
    assert_eq!(again, (md5_hex, sum));
}

/// The gateway's S3 service over an unreachable metad, built once.
struct Http {
    svc: S3Service,
    metrics: Metrics,
}

fn http() -> &'static Http {
    static HTTP: OnceLock<Http> = OnceLock::new();
    HTTP.get_or_init(|| {
        // Lazy channels spawn their workers on the runtime they are made in.
        let _rt = paused().enter();
        let meta = MetaClient::new(&["127.0.0.1:1".to_string()])
            .expect("a metad client")
            .with_retry_for(Duration::ZERO);
        let client = Client::with_meta(meta.clone(), ClientConfig::default());
        let pools = Pools {
            standard: "standard".into(),
            infrequent: "standard-ia".into(),
            archive: "archive".into(),
        };
        Http {
            svc: gateway_s3::s3_service(client, meta, pools),
            metrics: Metrics::new(),
        }
    })
}

/// How long the client waits for more of an answer before it closes its side. With the paused
/// clock this passes as soon as the server waits for more request bytes.
const QUIET: Duration = Duration::from_secs(60);
/// Past this, the server is stuck.
const HANG: Duration = Duration::from_secs(3600);

/// Sends `input` on a new connection, reads until the server goes quiet, closes, and reads
/// the rest; returns everything the server sent.
async fn exchange(input: &[u8]) -> Vec<u8> {
    let h = http();
    let (client, server) = tokio::io::duplex(1 << 20);
    let conn = tokio::spawn(gateway_s3::serve_connection(
        server,
        h.svc.clone(),
        h.metrics.clone(),
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let _ = wr.write_all(input).await;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match tokio::time::timeout(QUIET, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {
                let _ = wr.shutdown().await;
                tokio::time::timeout(HANG, rd.read_to_end(&mut out))
                    .await
                    .expect("the gateway kept the connection open after the client closed")
                    .ok();
                break;
            }
        }
    }
    tokio::time::timeout(HANG, conn)
        .await
        .expect("the connection did not end")
        .expect("the connection task panicked");
    out
}

/// The methods of the requests at the start of `input`, in order, as far as they can be told
/// apart (up to the first that is not whole or has a chunked body).
fn methods(mut input: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = req.parse(input) else {
            return out;
        };
        let mut body = Some(0usize);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                body = chunked_len(&input[n..]);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                body = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
        }
        out.extend(req.method.map(str::to_string));
        match body.and_then(|b| input.get(n.saturating_add(b)..)) {
            Some(rest) => input = rest,
            None => return out,
        }
    }
}

/// The length of a whole chunked body at the start of `b` (without trailers), if it is one.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = b[at..].windows(2).position(|w| w == b"\r\n")?;
        let text = std::str::from_utf8(&b[at..at + line]).ok()?;
        let size = usize::from_str_radix(text.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            return b[at..].starts_with(b"\r\n").then_some(at + 2);
        }
        at = at.checked_add(size)?.checked_add(2)?;
        if at > b.len() {
            return None;
        }
    }
}

/// Parses what the server sent as HTTP/1.x responses to requests with `methods` (a HEAD's
/// answer has no body); returns their status codes.
fn responses(mut out: &[u8], methods: &[String]) -> Vec<u16> {
    let mut codes = Vec::new();
    let mut finals = 0;
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "not a whole HTTP response head: {other:?} in {:?}",
                String::from_utf8_lossy(out)
            ),
        };
        let code = resp.code.expect("a status code");
        assert!((100..600).contains(&code), "status {code}");
        codes.push(code);
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let length =
            header("content-length").map(|v| v.trim().parse::<usize>().expect("a Content-Length"));
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        out = &out[head..];
        if code < 200 {
            continue;
        }
        finals += 1;
        if code == 204 || code == 304 {
            continue;
        }
        match methods.get(finals - 1).map(String::as_str) {
            Some("HEAD") => continue,
            // Past what the requests tell: a HEAD's answer is followed by the next answer (our
            // bodies are XML).
            None if length.is_some() && (out.is_empty() || out.starts_with(b"HTTP/")) => {
                continue;
            }
            _ => {}
        }
        if let Some(n) = length {
            assert!(out.len() >= n, "a body shorter than its Content-Length");
            out = &out[n..];
        } else if chunked {
            loop {
                let line_end = out
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("a chunk size line");
                let size_text = String::from_utf8_lossy(&out[..line_end]).into_owned();
                let n = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .expect("a chunk size");
                out = &out[line_end + 2..];
                if n == 0 {
                    // Trailers (none are sent) and the last CRLF.
                    assert!(out.starts_with(b"\r\n"), "end of a chunked body");
                    out = &out[2..];
                    break;
                }
                assert!(out.len() >= n + 2, "a torn chunk");
                out = &out[n + 2..];
            }
        } else {
            // Delimited by the end of the connection.
            break;
        }
    }
    codes
}

/// Whether the bytes begin with a whole HTTP/1.1 request head without a body, which the
/// server must answer.
fn starts_with_bodiless_request(input: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(input) else {
        return false;
    };
    let bodiless = !req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("expect")
            || h.name.eq_ignore_ascii_case("upgrade")
    });
    bodiless
        && req.version == Some(1)
        && req
            .path
            .is_some_and(|p| p.starts_with('/') && p.parse::<http::Uri>().is_ok())
        && req.method.is_some_and(|m| m != "CONNECT")
}

/// Raw bytes as an HTTP connection to the gateway: whatever comes back is well-formed HTTP;
/// a whole bodiless request gets an answer; the connection ends when the client closes it; and
/// a new connection is then served.
pub fn s3_http(data: &[u8]) {
    paused().block_on(async {
        let out = exchange(data).await;
        // With HTTP/2's preface the connection speaks HTTP/2 (binary frames), not checked here.
        let h2 = data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let codes = if h2 {
            Vec::new()
        } else {
            responses(&out, &methods(data))
        };
        if starts_with_bodiless_request(data) {
            assert!(!codes.is_empty(), "a whole request went unanswered");
        }
        let out = exchange(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert_eq!(
            responses(&out, &["GET".to_string()]),
            [403],
            "an anonymous ListBuckets is not refused: {:?}",
            String::from_utf8_lossy(&out)
        );
    });
}
