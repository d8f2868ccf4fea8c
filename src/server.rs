//! The HTTP side. Every answer comes from memory (`Metrics`), so a slow or dead
//! Prefect never slows a scrape.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tiny_http::{Header, Method, Request, Response, Server};

use crate::metrics::{Metrics, Readiness, CONTENT_TYPE};

const INDEX: &str = concat!(
    "<!DOCTYPE html>\n<html><head><title>Prefect exporter</title></head><body>\n",
    "<h1>Prefect exporter</h1>\n<p>Version ",
    env!("CARGO_PKG_VERSION"),
    "</p>\n<ul>\n<li><a href=\"/metrics\">/metrics</a></li>\n",
    "<li><a href=\"/healthz\">/healthz</a></li>\n<li><a href=\"/readyz\">/readyz</a></li>\n",
    "</ul>\n</body></html>\n"
);

/// Binds the given address, or by default every interface: IPv6 and IPv4 at once
/// where the host has IPv6, plain IPv4 otherwise.
pub fn bind(address: Option<IpAddr>, port: u16) -> Result<(Server, SocketAddr), String> {
    let candidates: Vec<IpAddr> = match address {
        Some(a) => vec![a],
        None => vec![
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ],
    };
    let mut last_error = String::new();
    for ip in candidates {
        match Server::http(SocketAddr::new(ip, port)) {
            Ok(server) => {
                let bound = server
                    .server_addr()
                    .to_ip()
                    .unwrap_or(SocketAddr::new(ip, port));
                return Ok((server, bound));
            }
            Err(e) => last_error = format!("{}: {e}", SocketAddr::new(ip, port)),
        }
    }
    Err(last_error)
}

/// Answers requests until `server.unblock()` is called.
pub fn serve(server: &Server, metrics: &Metrics) {
    for request in server.incoming_requests() {
        let response = route(&request, metrics);
        if let Err(e) = request.respond(response) {
            log::debug!("client went away: {e}");
        }
    }
}

type Answer = Response<Cursor<Vec<u8>>>;

fn route(request: &Request, metrics: &Metrics) -> Answer {
    let path = request.url().split(['?', '#']).next().unwrap_or("");
    let method = request.method();
    let head = *method == Method::Head;
    if !matches!(method, Method::Get | Method::Head) {
        let known = matches!(path, "/" | "/metrics" | "/healthz" | "/readyz");
        return if known {
            text(405, "method not allowed\n", head).with_header(header("Allow", "GET, HEAD"))
        } else {
            text(404, "not found\n", head)
        };
    }
    match path {
        "/metrics" => {
            let body = metrics.rendered();
            let len = body.len();
            let data = if head { Vec::new() } else { body.to_vec() };
            Response::new(
                200.into(),
                vec![header("Content-Type", CONTENT_TYPE)],
                Cursor::new(data),
                Some(len),
                None,
            )
        }
        "/" => {
            text(200, INDEX, head).with_header(header("Content-Type", "text/html; charset=utf-8"))
        }
        "/healthz" => text(200, "ok\n", head),
        "/readyz" => match metrics.readiness() {
            Readiness::Ready => text(200, "ready\n", head),
            Readiness::NotReady(why) => text(503, &format!("not ready: {why}\n"), head),
        },
        _ => text(404, "not found\n", head),
    }
}

fn text(status: u16, body: &str, head: bool) -> Answer {
    let len = body.len();
    let data = if head {
        Vec::new()
    } else {
        body.as_bytes().to_vec()
    };
    Response::new(
        status.into(),
        vec![header("Content-Type", "text/plain; charset=utf-8")],
        Cursor::new(data),
        Some(len),
        None,
    )
}

fn header(name: &str, value: &str) -> Header {
    // Names and values here are constants of this file.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid static header")
}
