//! Shared integration-test harness of the one test binary (tests/it/main.rs): every
//! module of tests/it/ names it as `crate::support`.
//!
//! - [`PrefectServer`]: a real Prefect 3 server (project venv, free loopback port,
//!   temporary `PREFECT_HOME` copied from a migrated template database), always
//!   stopped: by `Drop`, by an `atexit` hook for the shared server, and by
//!   a shell watchdog when the test process dies without running either.
//! - [`Api`]: a small REST client to seed flows, deployments, work pools and runs;
//!   [`seed_standard`] creates the standard data set and returns [`Expected`].
//! - [`Exporter`]: the built binary as a child process on a free port, with its
//!   output captured, a scrape parser and polling helpers; [`run_exporter_once`].
//! - [`Stub`]: a programmable HTTP/1.1 server for what a real Prefect cannot do
//!   (500s, garbage bodies, hangs); it records every request it sees.
//!
//! One file per concern, all re-exported here (test files name `support::X`):
//! `prefect_server.rs` (the real server, `require_prefect!`), `api.rs` (the seeding
//! REST `Api`, `seed_standard`, `Expected`), `exporter.rs` (the exporter process),
//! `stub.rs` (the stub API), `http.rs` (HTTP requests and `/metrics` parsing),
//! `common.rs` (signals, child processes, paths, temp folders, ports, polling, the
//! descriptor limit, the lock of the heavy tests), `tools.rs` (promtool and other
//! outside tools),
//! `ops.rs` (work queues, runs in progress and concurrency limits for the operator
//! groups), `events.rs` (the server's event count, a real SDK flow run).
//! The counting pass-through proxy lives with its only user, tests/it/request_cost.rs.
//!
//! Real-server tests start with `support::require_prefect!();`: outside CI a missing
//! venv (and a failed install) skips the test with a message; under `CI=true` it panics.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

mod api;
mod common;
mod exporter;
mod http;
mod prefect_server;
mod stub;
mod tools;

pub mod events;
pub mod ops;
pub use ops::{seed_ops, SeededOps};

#[allow(unused_imports)]
pub use api::*;
#[allow(unused_imports)]
pub use common::*;
#[allow(unused_imports)]
pub use exporter::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use prefect_server::*;
#[allow(unused_imports)]
pub use stub::*;
#[allow(unused_imports)]
pub use tools::*;
