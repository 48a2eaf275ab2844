//! Fixed TLS material for the lab's `tether-tls` method and `tether bench --tls`: a CA and a
//! server certificate for the name [`SERVER_NAME`], valid until 2126, embedded here so that
//! sides in different processes (the lab's peer process, the bench's agents) trust each
//! other without exchanging files. **Test material only: the private key is public.**
//! Never use it for anything but measurements on loopback or in the lab's namespaces.

use std::path::{Path, PathBuf};

/// The CA certificate (PEM).
pub const CA_PEM: &str = include_str!("tls/ca.pem");
/// The server certificate (PEM), issued by [`CA_PEM`] for [`SERVER_NAME`].
pub const SERVER_PEM: &str = include_str!("tls/server.pem");
/// The server certificate's private key (SEC1 PEM). Public: test material only.
pub const SERVER_KEY: &str = include_str!("tls/server.key");
/// The DNS name the server certificate holds (clients verify it with `--server-name`).
pub const SERVER_NAME: &str = "tether-lab";

/// The three files written into `dir`.
#[derive(Debug, Clone)]
pub struct Files {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
}

/// Writes the material into `dir` (created if needed) as `ca.pem`, `server.pem` and
/// `server.key`.
pub fn write(dir: &Path) -> std::io::Result<Files> {
    std::fs::create_dir_all(dir)?;
    let f = Files {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&f.ca, CA_PEM)?;
    std::fs::write(&f.cert, SERVER_PEM)?;
    std::fs::write(&f.key, SERVER_KEY)?;
    Ok(f)
}
