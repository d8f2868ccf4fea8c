//! Issue 3: https to Prefect. A certificate authority and a server certificate
//! are generated here (rcgen) and a small TLS-terminating proxy (rustls) is put in
//! front of the real Prefect server: without the CA the exporter fails with a
//! TLS error in its log; with PREFECT_API_SSL_CERT_FILE (or SSL_CERT_FILE) it
//! gives the right values; with PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true it works
//! and logs a warning.
use crate::support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use support::{run_exporter_once, Exporter, PrefectServer, TempDir};

const ERRORS: &str = "prefect_exporter_collect_errors_total";
const WAIT: Duration = Duration::from_secs(30);
/// Debug builds make TLS handshakes slow, and tests run side by side on few
/// cores: a wider collection deadline than the default 1 s of the harness.
/// Five exporters share the one Prefect server behind TLS proxies at once: a
/// collection of every group needs room on a loaded 2-core machine.
const INTERVAL: (&str, &str) = ("EXPORTER_INTERVAL", "5");

/// A CA (its PEM written to `ca.pem`) and a server certificate for `names`.
struct Pki {
    _dir: TempDir,
    ca_pem: PathBuf,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn pki(names: &[&str]) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "prefect-exporter test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut leaf = CertificateParams::new(names).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "prefect test server");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let dir = TempDir::new("issue3-tls");
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    Pki {
        _dir: dir,
        ca_pem,
        server_cert: leaf_cert.der().clone(),
        server_key: leaf_key.serialize_der(),
    }
}

/// Terminates TLS on a free loopback port and relays the plain bytes to `backend`.
struct TlsProxy {
    addr: SocketAddr,
    /// One entry per handshake: Ok, or the error the server side saw.
    handshakes: Arc<Mutex<Vec<Result<(), String>>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl TlsProxy {
    fn start(pki: &Pki, backend: SocketAddr) -> TlsProxy {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone())),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes: Arc<Mutex<Vec<Result<(), String>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (handshakes.clone(), stop.clone());
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(tcp) = conn {
                    let (config, h, st) = (config.clone(), h.clone(), st.clone());
                    thread::spawn(move || relay(tcp, config, backend, h, st));
                }
            }
        });
        TlsProxy {
            addr,
            handshakes,
            stop,
            accept: Some(accept),
        }
    }

    /// `https://127.0.0.1:PORT/api`
    fn api_url(&self, host: &str) -> String {
        format!("https://{host}:{}/api", self.addr.port())
    }

    fn handshakes(&self) -> Vec<Result<(), String>> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn relay(
    mut tcp: TcpStream,
    config: Arc<ServerConfig>,
    backend: SocketAddr,
    handshakes: Arc<Mutex<Vec<Result<(), String>>>>,
    stop: Arc<AtomicBool>,
) {
    let mut conn = ServerConnection::new(config).unwrap();
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            handshakes.lock().unwrap().push(Err(e.to_string()));
            return;
        }
    }
    handshakes.lock().unwrap().push(Ok(()));
    let Ok(mut upstream) = TcpStream::connect(backend) else {
        return;
    };
    // One thread, both directions: short read timeouts and alternate.
    let tick = Some(Duration::from_millis(5));
    let _ = tcp.set_read_timeout(tick);
    let _ = upstream.set_read_timeout(tick);
    let mut tls = StreamOwned::new(conn, tcp);
    let mut buf = vec![0u8; 16 * 1024];
    let idle = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    while !stop.load(Ordering::SeqCst) {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if upstream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => break,
        }
        match upstream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tls.write_all(&buf[..n]).and_then(|_| tls.flush()).is_err() {
                    break;
                }
            }
            Err(e) if idle(&e) => {}
            Err(_) => break,
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// The shared real server behind a TLS proxy with a certificate for `names`.
fn tls_in_front_of_prefect(names: &[&str]) -> (Pki, TlsProxy) {
    let server = PrefectServer::shared();
    let backend: SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let pki = pki(names);
    let proxy = TlsProxy::start(&pki, backend);
    (pki, proxy)
}

fn assert_correct_values(m: &HashMap<String, f64>, exp: &Exporter) {
    exp.assert_gauges(m, &support::shared_expected().seed_gauges(&[]));
    assert_eq!(m.get("prefect_up").copied(), Some(1.0));
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn without_the_ca_the_certificate_is_refused_and_the_log_says_so() {
    support::require_prefect!();
    let (_pki, proxy) = tls_in_front_of_prefect(&["localhost", "127.0.0.1"]);
    let url = proxy.api_url("127.0.0.1");
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), INTERVAL]);
    let m = exp.first_collection(WAIT);
    assert!(m[ERRORS] >= 1.0, "{}", exp.stderr());
    assert_eq!(m.get("prefect_up").copied(), Some(0.0));
    assert!(!m.contains_key("prefect_flow_runs_total"));
    let log = exp.wait_log("a TLS problem, the certificate's unknown issuer", |log| {
        log.contains("TLS problem") && log.contains("certificate") && log.contains("UnknownIssuer")
    });
    assert!(
        log.contains("PREFECT_API_SSL_CERT_FILE"),
        "the log points at the fix: {log}"
    );
    // The handshake was refused by the exporter, never completed.
    assert!(!proxy.handshakes().is_empty());
    assert!(
        proxy.handshakes().iter().all(Result::is_err),
        "{:?}",
        proxy.handshakes()
    );
}

#[test]
fn with_the_ca_file_it_gives_the_right_values() {
    support::require_prefect!();
    let (pki, proxy) = tls_in_front_of_prefect(&["localhost", "127.0.0.1"]);
    let ca = path_str(&pki.ca_pem);
    for (var, host) in [
        ("PREFECT_API_SSL_CERT_FILE", "127.0.0.1"),
        ("SSL_CERT_FILE", "localhost"),
    ] {
        let url = proxy.api_url(host);
        let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), (var, &ca), INTERVAL]);
        let m = exp.first_collection(WAIT);
        assert_correct_values(&m, &exp);
        assert!(
            exp.stderr().contains(&format!("ca_file={ca}")),
            "{}",
            exp.stderr()
        );
    }
    assert!(proxy.handshakes().iter().any(Result::is_ok));
}

#[test]
fn a_certificate_for_another_name_is_refused_even_with_the_ca() {
    support::require_prefect!();
    let (pki, proxy) = tls_in_front_of_prefect(&["prefect.internal.example"]);
    let url = proxy.api_url("127.0.0.1");
    let ca = path_str(&pki.ca_pem);
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_SSL_CERT_FILE", &ca),
    ]);
    let m = exp.first_collection(WAIT);
    assert!(m[ERRORS] >= 1.0);
    exp.wait_log(
        "a TLS problem, the name the certificate is not valid for",
        |log| log.contains("TLS problem") && log.contains("not valid for name"),
    );
}

#[test]
fn skip_verify_works_and_logs_a_warning() {
    support::require_prefect!();
    let (_pki, proxy) = tls_in_front_of_prefect(&["localhost"]);
    let url = proxy.api_url("127.0.0.1");
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "true"),
        INTERVAL,
    ]);
    let m = exp.first_collection(WAIT);
    assert_correct_values(&m, &exp);
    let log = exp.stderr();
    let warning = log
        .lines()
        .find(|l| l.contains("PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(
        warning.contains("[WARN]") && warning.contains("NOT checked"),
        "{warning}"
    );
}

#[test]
/// A missing file named by the machine-wide SSL_CERT_FILE is only a warning (see
/// src/config/settings.rs); a file that exists but holds no certificate is always an error.
fn an_unusable_ca_file_stops_the_start_naming_the_variable() {
    let dir = TempDir::new("issue3-badca");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for (var, file) in [
        ("PREFECT_API_SSL_CERT_FILE", &not_pem),
        ("PREFECT_API_SSL_CERT_FILE", &missing),
        ("SSL_CERT_FILE", &not_pem),
    ] {
        let f = path_str(file);
        let out = run_exporter_once(
            &[],
            &[("PREFECT_API_URL", "https://127.0.0.1:1/api"), (var, &f)],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={f}: {err}");
        assert!(
            err.starts_with(&format!("prefect-exporter: {var}={f}")),
            "{err}"
        );
    }
}
