//! Varint-length-delimited frames: the UDF wire protocol (DESIGN §5) and the
//! control protocol both use them.

/// Result of looking for a frame header at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// More bytes are needed to read the length.
    Incomplete,
    /// The frame body has `len` bytes and starts at `offset`.
    Complete { offset: usize, len: u64 },
    /// The length is not a valid varint (more than 10 bytes or overflowing u64).
    Invalid,
}

/// Parses the varint length prefix at the start of `buf`.
pub fn parse_header(buf: &[u8]) -> Header {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && b > 1 {
            return Header::Invalid;
        }
        value |= part << (7 * i);
        if b & 0x80 == 0 {
            return Header::Complete { offset: i + 1, len: value };
        }
    }
    if buf.len() >= 10 {
        Header::Invalid
    } else {
        Header::Incomplete
    }
}

/// Encodes `msg` as one length-delimited frame.
pub fn encode<M: prost::Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// Appends `msg` as one length-delimited frame to `out`.
pub fn encode_into<M: prost::Message>(msg: &M, out: &mut Vec<u8>) {
    // A Vec grows as needed: encoding into it cannot fail.
    let _ = msg.encode_length_delimited(out);
}

/// Accumulates bytes from a stream and yields complete frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame body, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self, max_len: u64) -> Result<Option<&[u8]>, String> {
        let pending = &self.buf[self.start..];
        match parse_header(pending) {
            Header::Incomplete => Ok(None),
            Header::Invalid => Err("invalid varint frame length".to_string()),
            Header::Complete { offset, len } => {
                if len > max_len {
                    return Err(format!("frame of {len} bytes exceeds the limit of {max_len}"));
                }
                let len = len as usize;
                if pending.len() < offset + len {
                    return Ok(None);
                }
                let begin = self.start + offset;
                self.start = begin + len;
                Ok(Some(&self.buf[begin..begin + len]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(parse_header(&[]), Header::Incomplete);
        assert_eq!(parse_header(&[0x05]), Header::Complete { offset: 1, len: 5 });
        assert_eq!(parse_header(&[0x80]), Header::Incomplete);
        assert_eq!(parse_header(&[0xac, 0x02]), Header::Complete { offset: 2, len: 300 });
        assert_eq!(parse_header(&[0xff; 11]), Header::Invalid);
        assert_eq!(parse_header(&[0xff; 10]), Header::Invalid);
    }

    #[test]
    fn decoder_splits_frames_across_chunks() {
        let mut d = Decoder::default();
        d.extend(&[3, b'a', b'b']);
        assert_eq!(d.next_frame(100).unwrap(), None);
        d.extend(&[b'c', 1]);
        assert_eq!(d.next_frame(100).unwrap(), Some(&b"abc"[..]));
        assert_eq!(d.next_frame(100).unwrap(), None);
        d.extend(b"z");
        assert_eq!(d.next_frame(100).unwrap(), Some(&b"z"[..]));
        d.extend(&[50]);
        assert!(d.next_frame(10).is_err());
    }
}
