//! The exporter's HTTP connections, seen from outside tiny_http: it keeps no
//! list of them, sets no timeout on them and offers no way to close one, so the
//! request loop finds them among the process's own descriptors.
//!
//! Each descriptor number is duplicated before it is looked at, and every check
//! and the shutdown go through that duplicate: if tiny_http closed the number
//! and a new socket took it meanwhile, the checks see the new socket, never a
//! mix of two. tiny_http holds each connection twice (a reading and a writing
//! clone); the socket's inode tells the two apart from two connections.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

/// `tcpi_state` of an established connection (linux/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;

/// One accepted connection on the exporter's port.
#[derive(Debug)]
pub struct Connection {
    /// The socket's inode: the same for both of tiny_http's clones, and never
    /// shared by two open sockets.
    pub inode: u64,
    pub peer: SocketAddr,
    /// False once either side has started to close it (peer gone, or shut
    /// down by the request loop): tiny_http's thread should then close it at
    /// once, unless it is stuck.
    pub established: bool,
    /// Since data last went either way, as the kernel counts it.
    pub idle: Duration,
    /// Bytes the client sent that nobody has read yet, and since when the last
    /// ones came: a request that waits so is a connection no thread serves.
    pub unread: bool,
    pub since_received: Duration,
}

/// Every connection accepted on `port`, once each, calling `act` on each with
/// the socket itself (to shut it down). Fails only when the descriptors cannot
/// be listed or duplicated (out of descriptors): the caller tries again later.
pub fn each(port: u16, mut act: impl FnMut(&Connection, &TcpStream)) -> io::Result<()> {
    let mut seen = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Some((socket, inode)) = duplicate(fd)? else {
            continue;
        };
        if seen.contains(&inode) {
            continue;
        }
        if let Some(conn) = inspect(&socket, inode, port) {
            seen.insert(inode);
            act(&conn, &socket);
        }
    }
    Ok(())
}

/// Shuts down the connection from `peer` (both ways: the client sees the end,
/// tiny_http's thread reads end of file). False if no such connection is open.
pub fn shut_down(port: u16, peer: SocketAddr, how: Shutdown) -> io::Result<bool> {
    let mut found = false;
    each(port, |conn, socket| {
        if conn.peer == peer {
            found |= socket.shutdown(how).is_ok();
        }
    })?;
    Ok(found)
}

/// Raises the soft limit on open descriptors to the hard one, as Go programs
/// do at start: each connection takes two (tiny_http clones every socket), and
/// the usual soft limit of 1,024 would stop at about 500 connections. Returns
/// the limits before and after, or why they stayed.
pub fn raise_descriptor_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// A duplicate of descriptor `fd` that is a socket, with its inode, or `None`
/// (closed since the listing, or not a socket).
fn duplicate(fd: libc::c_int) -> io::Result<Option<(TcpStream, u64)>> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches nothing else;
    // on EBADF (closed since the listing) nothing is created.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBADF) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: `dup` was just created and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    let file = File::from(owned);
    let meta = file.metadata()?;
    if !meta.file_type().is_socket() {
        return Ok(None);
    }
    Ok(Some((TcpStream::from(OwnedFd::from(file)), meta.ino())))
}

/// The connection behind `socket` when it is one accepted on `port`: a TCP
/// socket with that local port and a peer (the listener itself has none, and
/// the Prefect client's sockets have other local ports).
fn inspect(socket: &TcpStream, inode: u64, port: u16) -> Option<Connection> {
    if socket.local_addr().ok()?.port() != port {
        return None;
    }
    let peer = socket.peer_addr().ok()?;
    let info = tcp_info(socket)?;
    Some(Connection {
        inode,
        peer,
        established: info.tcpi_state == TCP_ESTABLISHED,
        idle: Duration::from_millis(u64::from(
            info.tcpi_last_data_recv.min(info.tcpi_last_data_sent),
        )),
        unread: unread_bytes(socket) > 0,
        since_received: Duration::from_millis(u64::from(info.tcpi_last_data_recv)),
    })
}

fn unread_bytes(socket: &TcpStream) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, the bytes in the receive queue.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        n
    } else {
        0
    }
}

fn tcp_info(socket: &TcpStream) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and sets `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write `limit` only.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            let hard = limit.rlim_max;
            limit.rlim_cur = hard.min(256);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
            let (before, after) = raise_descriptor_limit().unwrap();
            assert_eq!((before, after), (hard.min(256), hard));
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            assert_eq!(limit.rlim_cur, hard);
        }
    }

    #[test]
    fn finds_each_accepted_connection_once_and_shuts_one_down() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        // A second descriptor for the same socket, as tiny_http holds.
        let _clone = accepted.try_clone().unwrap();
        // An outgoing socket of this process on another port is not ours.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let _outgoing = TcpStream::connect(other.local_addr().unwrap()).unwrap();

        let mut found = Vec::new();
        each(port, |c, _| found.push((c.peer, c.established))).unwrap();
        assert_eq!(found, vec![(peer, true)]);

        assert!(shut_down(port, peer, Shutdown::Both).unwrap());
        let mut buf = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the client sees the end");
        let mut after = Vec::new();
        each(port, |c, _| after.push(c.established)).unwrap();
        assert_eq!(
            after,
            vec![false],
            "still open here, but no longer established"
        );
        let unknown: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!shut_down(port, unknown, Shutdown::Both).unwrap());
    }
}
