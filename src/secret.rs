//! Secrets at their lowest level: random bytes from the system source, their base64url and hex
//! forms, SHA-256, and files only their owner can read. Everything above (tokens, keys, codes)
//! is made from these.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("invariant: the system random source works");
    b
}

/// Unpadded base64url, the form of every token poort hands out.
pub fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

pub fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Writes a new file only its owner can read (keys, secrets); an existing file is an error.
/// Replaces `path` with `bytes`, owner-only, all at once: written to a new file beside it,
/// then renamed over it, so that a reader sees the old contents or the new, never a mix, and a
/// crash leaves the old file.
pub fn replace_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).context("a file name")?;
    let tmp = path.with_file_name(format!(".{name}.{}", hex(&random_bytes::<6>())));
    write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display())).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads a file an operator names (a certificate, a key, a rules file): only a regular file,
/// of at most `max` bytes. A FIFO, a device or an endless file would otherwise stall or fill
/// the gateway. Opened without waiting (a FIFO with no writer), then checked on the open file.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO does not wait for a writer; reading a regular file ignores it.
    const O_NONBLOCK: i32 = 0o4000;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
    }
    Ok(out)
}

pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bounded_regular_file_is_read() {
        let dir = std::env::temp_dir().join(format!("poort-read-{}", hex(&random_bytes::<6>())));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ok"), b"0123456789").unwrap();
        assert_eq!(read_regular(&dir.join("ok"), 10).unwrap(), b"0123456789");
        assert!(read_regular(&dir.join("ok"), 9).is_err(), "over the bound");
        // A FIFO with no writer: refused at once rather than waited on.
        assert!(std::process::Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success());
        assert!(read_regular(&dir.join("fifo"), 10).is_err());
        // An endless file behind a link.
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        assert!(read_regular(&dir.join("zero"), 1 << 20).is_err());
        // Replacing keeps the file owner-only and whole.
        replace_private(&dir.join("ok"), b"new").unwrap();
        assert_eq!(std::fs::read(dir.join("ok")).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
