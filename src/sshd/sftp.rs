//! What an SFTP session did to files, read off the client's requests as they pass (the SSH
//! File Transfer Protocol, draft version 3, which OpenSSH speaks): each file opened for reading
//! or writing, removed, renamed, and each folder made or removed. File contents are counted,
//! never kept. Only the start of a request is looked at; a write's data is skipped unread.

/// Requests whose names are noted.
const OPEN: u8 = 3;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
/// Names noted per channel at most; after that they are counted.
const KEEP: usize = 200;
/// Bytes of a request read to find its names (a path is at most 4 KiB on Linux).
const LOOK: usize = 2 * 4096 + 64;

#[derive(Debug, Default)]
pub struct Files {
    /// The start of the request being read: its length, type and as much as `LOOK` of it.
    head: Vec<u8>,
    /// Bytes of the current request still to pass unread.
    skip: u64,
    pub seen: Vec<String>,
    /// Names not kept past `KEEP`.
    pub more: u64,
}

impl Files {
    /// Reads the client's bytes of the channel, in the order sent.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            // Gather the length and type, then what the request's kind needs.
            let want = if self.head.len() < 5 {
                5
            } else {
                let len = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as usize;
                let named = matches!(self.head[4], OPEN | REMOVE | MKDIR | RMDIR | RENAME);
                4 + if named { len.min(LOOK) } else { 1 }
            };
            let n = (want - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.head.len() < want {
                continue;
            }
            if self.head.len() == 5 && want == 5 {
                let len = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as usize;
                let named = matches!(self.head[4], OPEN | REMOVE | MKDIR | RMDIR | RENAME);
                if named && len > 1 {
                    continue;
                }
            }
            let len = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as u64;
            self.note();
            self.skip = (4 + len).saturating_sub(self.head.len() as u64);
            self.head.clear();
        }
    }

    /// Notes the request in `head` (length, type, id, fields), if it names files.
    fn note(&mut self) {
        let Some((&kind, body)) = self.head.get(4..).and_then(|b| b.split_first()) else { return };
        let mut r = Fields(body.get(4..).unwrap_or_default());
        let entry = match kind {
            OPEN => r.string().map(|p| {
                let flags = r.u32().unwrap_or(0);
                let how = if flags & 0x2 != 0 { "write" } else { "read" };
                format!("{how} {p}")
            }),
            REMOVE => r.string().map(|p| format!("remove {p}")),
            MKDIR => r.string().map(|p| format!("mkdir {p}")),
            RMDIR => r.string().map(|p| format!("rmdir {p}")),
            RENAME => r.string().and_then(|a| r.string().map(|b| format!("rename {a} -> {b}"))),
            _ => None,
        };
        if let Some(e) = entry {
            if self.seen.len() < KEEP {
                self.seen.push(e);
            } else {
                self.more += 1;
            }
        }
    }
}

/// SSH wire fields.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (v, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*v))
    }

    /// A string as text: at most 512 characters, control characters shown as `?`.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        let s = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(String::from_utf8_lossy(s).chars().take(512).map(|c| if c.is_control() { '?' } else { c }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind, 0, 0, 0, 7];
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn names_are_read_across_any_cut_and_data_is_skipped() {
        let mut stream = Vec::new();
        // INIT (no id), an open for writing, a 100 KiB write, a rename, an open for reading.
        stream.extend_from_slice(&[0, 0, 0, 5, 1, 0, 0, 0, 3]);
        stream.extend(packet(OPEN, &[&string("/tmp/up.bin"), &0x1au32.to_be_bytes(), &[0, 0, 0, 0]]));
        let data = vec![0x5a; 100 * 1024];
        stream.extend(packet(6, &[&string("handle"), &0u64.to_be_bytes(), &(data.len() as u32).to_be_bytes(), &data]));
        stream.extend(packet(RENAME, &[&string("/tmp/up.bin"), &string("/tmp/up\nname")]));
        stream.extend(packet(OPEN, &[&string("/etc/hostname"), &1u32.to_be_bytes(), &[0, 0, 0, 0]]));
        let want = ["write /tmp/up.bin", "rename /tmp/up.bin -> /tmp/up?name", "read /etc/hostname"];
        for cut in [1, 2, 3, 5, 7, 64, 4096, stream.len()] {
            let mut f = Files::default();
            for chunk in stream.chunks(cut) {
                f.feed(chunk);
            }
            assert_eq!(f.seen, want, "chunks of {cut}");
            assert!(f.head.is_empty() && f.skip == 0);
        }
    }
}
