//! Plain HTTP requests and answers, and the parsing of `/metrics` text.

use super::*;

// ---------------------------------------------------------------------------
// Raw HTTP client (for the exporter and the stub)
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer
/// (chunked bodies decoded). Timeouts: connect 5 s, read 10 s.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let sock: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {addr}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

pub(crate) fn parse_response(raw: &[u8], head: bool) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked && !head {
        body = decode_chunked(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Why [`read_answer`] read no whole answer.
#[derive(Debug)]
pub struct ReadError {
    /// The connection ended (end of file or reset) before any byte of the
    /// answer: a kept connection the server had closed, worth one new try.
    pub closed_before_answer: bool,
    pub what: String,
}

/// Reads one answer with a `Content-Length` body from a kept (or pipelined)
/// connection, as a keep-alive client does; what follows it stays in `buf`.
/// Returns the status; the read timeout is the stream's.
pub fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16, ReadError> {
    let mut chunk = [0u8; 64 * 1024];
    let mut read_more = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Result<(), ReadError> {
        let empty = buf.is_empty();
        match s.read(&mut chunk) {
            Ok(0) => Err(ReadError {
                closed_before_answer: empty,
                what: format!("closed after {} bytes", buf.len()),
            }),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(ReadError {
                closed_before_answer: empty && e.kind() == std::io::ErrorKind::ConnectionReset,
                what: format!("{e} after {} bytes", buf.len()),
            }),
        }
    };
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let fail = |what: String| ReadError {
        closed_before_answer: false,
        what,
    };
    let status = head
        .get(9..12)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail(format!("no status: {head}")))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| fail(format!("no content-length: {head}")))?;
    while buf.len() < end + length {
        read_more(s, buf)?;
    }
    buf.drain(..end + length);
    Ok(status)
}

// ---------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------

/// The sum of every series of a labelled family in a parsed scrape.
pub fn family_sum(m: &HashMap<String, f64>, family: &str) -> f64 {
    let prefix = format!("{family}{{");
    m.iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .sum()
}

/// `name{a="x",b="y"}`: the labels sorted and escaped as the exporter prints
/// them (`name` alone without labels), a key of [`parse_metrics`].
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut labels = labels.to_vec();
    labels.sort();
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// The collection counter of a parsed scrape (0 before the first collection).
pub fn collections(m: &HashMap<String, f64>) -> f64 {
    m.get("prefect_exporter_collections_total")
        .copied()
        .unwrap_or(0.0)
}

/// The scrape's collection had each of `groups` succeed.
pub fn groups_ok(m: &HashMap<String, f64>, groups: &[&str]) -> bool {
    groups.iter().all(|g| {
        m.get(&series(
            "prefect_exporter_collector_success",
            &[("collector", g)],
        )) == Some(&1.0)
    })
}

/// The scrape's collection had every group it shows succeed (at least one).
pub fn all_groups_ok(m: &HashMap<String, f64>) -> bool {
    let mut groups = m
        .iter()
        .filter(|(k, _)| k.starts_with("prefect_exporter_collector_success{"))
        .map(|(_, v)| *v)
        .peekable();
    groups.peek().is_some() && groups.all(|v| v == 1.0)
}

/// Parses the text exposition format into `series -> value`, where the series is
/// the metric name with its labels exactly as printed (`name{a="x",b="y"}`).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) if line[..open].chars().all(|c| !c.is_whitespace()) => {
                // Find the closing brace outside quoted label values.
                let mut in_quotes = false;
                let mut escaped = false;
                let mut close = None;
                for (i, c) in line.char_indices().skip(open) {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' if in_quotes => escaped = true,
                        '"' => in_quotes = !in_quotes,
                        '}' if !in_quotes => {
                            close = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                match close {
                    Some(c) => (&line[..=c], &line[c + 1..]),
                    None => continue,
                }
            }
            _ => match line.split_once(char::is_whitespace) {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        if let Some(v) = rest.split_whitespace().next().and_then(parse_value) {
            out.insert(series.to_string(), v);
        }
    }
    out
}

pub(crate) fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}
