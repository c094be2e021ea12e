//! Recordings of SSH sessions in asciicast v2 (the format of asciinema): a JSON header line,
//! then one JSON array per event, `[seconds, "o" | "i" | "r", text]`: output, input, and a
//! terminal resize as `COLSxROWS`. Each line is written and flushed as it happens, so that a
//! recording cut short by a crash still holds everything before it, and the SHA-256 of the
//! bytes written is kept as they go: the audit record of the channel carries it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ring::digest;

/// Where recordings are kept: `recordings` in the data folder, next to the audit database.
pub fn folder(data_dir: &Path) -> PathBuf {
    data_dir.join("recordings")
}

/// What a recording's header says.
pub struct Header<'a> {
    pub width: u32,
    pub height: u32,
    /// Unix seconds at the start.
    pub timestamp: i64,
    pub title: &'a str,
    pub term: &'a str,
}

/// The recordings being written by this process, by name.
static OPEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Whether this process is still writing the recording `name`.
pub fn is_open(name: &str) -> bool {
    OPEN.lock().map(|o| o.iter().any(|n| n == name)).unwrap_or(false)
}

/// Whether `name` has the form of a name a recorder made (a time, a session id, a number):
/// checked again before any name read from the audit log becomes a path.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 128
        && name.ends_with(".cast")
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.contains("..")
}

/// Bytes one recording may hold: a session whose recording reaches it ends.
pub const LIMIT: u64 = 256 << 20;

pub struct Recorder {
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
    hash: digest::Context,
    start: Instant,
    /// The end of the last chunk each way when it stopped inside a UTF-8 sequence.
    carry: [Vec<u8>; 2],
    name: String,
    broken: bool,
}

impl Recorder {
    /// Starts `name` in `dir` (made if missing, owner-only); refuses to overwrite.
    pub fn create(dir: &Path, name: &str, h: &Header<'_>) -> std::io::Result<Recorder> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        if !valid_name(name) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a recording's name"));
        }
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join(name))?;
        if let Ok(mut o) = OPEN.lock() {
            o.push(name.to_string());
        }
        let mut r = Recorder {
            file: std::io::BufWriter::new(file),
            written: 0,
            hash: digest::Context::new(&digest::SHA256),
            start: crate::clock::instant(),
            carry: [Vec::new(), Vec::new()],
            name: name.to_string(),
            broken: false,
        };
        let header = serde_json::json!({
            "version": 2,
            "width": h.width.clamp(1, 1000),
            "height": h.height.clamp(1, 1000),
            "timestamp": h.timestamp,
            "title": h.title,
            "env": { "TERM": h.term },
        });
        r.line(&header.to_string())?;
        Ok(r)
    }

    fn line(&mut self, s: &str) -> std::io::Result<()> {
        self.written += s.len() as u64 + 1;
        self.hash.update(s.as_bytes());
        self.hash.update(b"\n");
        self.file.write_all(s.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.file.flush()
    }

    fn event(&mut self, code: &str, text: &str) {
        if self.broken || self.full() {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        let line = serde_json::json!([(t * 1e6).round() / 1e6, code, text]).to_string();
        if let Err(e) = self.line(&line) {
            tracing::error!(error = %e, recording = %self.name, "Writing a recording failed");
            self.broken = true;
        }
    }

    /// Bytes the target sent (`output`) or the person typed (`input`). A UTF-8 sequence cut
    /// between two chunks is kept for the next; bytes that are not UTF-8 become U+FFFD.
    fn bytes(&mut self, which: usize, code: &str, data: &[u8]) {
        let mut all = std::mem::take(&mut self.carry[which]);
        all.extend_from_slice(data);
        let keep = incomplete_tail(&all);
        let tail = all.split_off(all.len() - keep);
        self.carry[which] = tail;
        if !all.is_empty() {
            let text = String::from_utf8_lossy(&all).into_owned();
            self.event(code, &text);
        }
    }

    /// Whether the recording reached `LIMIT` (it takes nothing more).
    pub fn full(&self) -> bool {
        self.written >= LIMIT
    }

    /// The file name in the recordings folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn output(&mut self, data: &[u8]) {
        self.bytes(0, "o", data);
    }

    pub fn input(&mut self, data: &[u8]) {
        self.bytes(1, "i", data);
    }

    pub fn resize(&mut self, width: u32, height: u32) {
        self.event("r", &format!("{}x{}", width.clamp(1, 1000), height.clamp(1, 1000)));
    }

    /// Ends the recording: its file name and the SHA-256 (hex) of all it holds.
    pub fn finish(mut self) -> (String, String) {
        for (which, code) in [(0, "o"), (1, "i")] {
            let rest = std::mem::take(&mut self.carry[which]);
            if !rest.is_empty() {
                let text = String::from_utf8_lossy(&rest).into_owned();
                self.event(code, &text);
            }
        }
        let _ = self.file.get_ref().sync_data();
        let sum = crate::secret::hex(self.hash.clone().finish().as_ref());
        (self.name.clone(), sum)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Ok(mut o) = OPEN.lock() {
            o.retain(|n| *n != self.name);
        }
    }
}

/// Text for an HTML element's content: `&`, `<` and `>` escaped (a recording's lines are JSON,
/// whose strings hold no raw control characters).
fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A page around a recording: `before`, the recording's lines escaped, `after`. While the
/// recording is being written (by this process), its lines are sent as they are written, so
/// that a page shows the session live; the page ends when the recording does, or after
/// `longest`. At most `limit` bytes of recording are sent.
pub fn page_stream(
    before: String,
    after: String,
    path: PathBuf,
    name: String,
    limit: u64,
    longest: std::time::Duration,
) -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        if tx.send(before.into()).await.is_err() {
            return;
        }
        let started = crate::clock::instant();
        let (mut sent, mut partial) = (0u64, Vec::new());
        loop {
            let open = is_open(&name);
            let mut chunk = Vec::new();
            if let Ok(mut f) = std::fs::File::open(&path)
                && f.seek(SeekFrom::Start(sent + partial.len() as u64)).is_ok()
            {
                let _ = f.take(256 * 1024).read_to_end(&mut chunk);
            }
            partial.extend_from_slice(&chunk);
            // Whole lines only: a line is one event.
            if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
                let lines: Vec<u8> = partial.drain(..=end).collect();
                sent += lines.len() as u64;
                let text = escape_html(&String::from_utf8_lossy(&lines));
                if tx.send(text.into()).await.is_err() {
                    return;
                }
            }
            if sent >= limit || started.elapsed() >= longest || (!open && chunk.is_empty()) {
                break;
            }
            if chunk.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        let _ = tx.send(after.into()).await;
    });
    rx
}

/// How many bytes at the end of `b` begin a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// The output of a recording played back: every "o" event's text in order (what a replay
/// shows on the terminal).
pub fn replay_output(cast: &str) -> String {
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get(1).and_then(|c| c.as_str()) == Some("o"))
        .filter_map(|v| v.get(2).and_then(|t| t.as_str()).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_between_chunks_is_recorded_whole() {
        let dir =
            std::env::temp_dir().join(format!("poort-rec-{}", crate::secret::hex(&crate::secret::random_bytes::<6>())));
        let h = Header { width: 80, height: 24, timestamp: 1, title: "t", term: "xterm" };
        let mut r = Recorder::create(&dir, "a.cast", &h).unwrap();
        let text = "héllo → wörld\n".as_bytes();
        for chunk in text.chunks(1) {
            r.output(chunk);
        }
        r.input(b"ls\r");
        r.resize(100, 30);
        let (name, sum) = r.finish();
        let cast = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert_eq!(replay_output(&cast), "héllo → wörld\n");
        assert!(cast.contains(r#""i","ls\r""#), "{cast}");
        assert!(cast.contains(r#""r","100x30""#), "{cast}");
        let digest = crate::secret::hex(digest::digest(&digest::SHA256, cast.as_bytes()).as_ref());
        assert_eq!(sum, digest, "the sum is of the bytes on disk");
        assert!(Recorder::create(&dir, "a.cast", &h).is_err(), "a recording is never overwritten");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn incomplete_tails_are_found() {
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[b'a', 0xC3]), 1);
        assert_eq!(incomplete_tail(&[0xE2, 0x86]), 2);
        assert_eq!(incomplete_tail(&[0xE2, 0x86, 0x92]), 0);
        assert_eq!(incomplete_tail(&[0xF0, 0x9F, 0x98]), 3);
        assert_eq!(incomplete_tail(&[0xFF]), 0);
    }
}
