//! Byte-level pieces of the protocol: varints, frames, the host-call frame and the
//! host reply message (proto/host_api.proto).

/// The varint every host call starts with: a frame length no response can have.
/// Encoded it is `80 80 80 80 80 80 80 80 80 01`.
pub const CALL_MARKER: u64 = 1 << 63;

/// Largest encoded size of a varint.
pub const MAX_VARINT_LEN: usize = 10;

/// Appends `v` as a protobuf varint (LEB128).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes the varint encoding of `v` takes (1..=10).
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Adds the next byte of a varint being decoded. Returns `Ok(Some(value))` when `b`
/// was its last byte, `Ok(None)` when more bytes follow, `Err` when it is longer
/// than 10 bytes or overflows 64 bits.
pub fn varint_step(value: &mut u64, index: usize, b: u8) -> Result<Option<u64>, &'static str> {
    if index >= MAX_VARINT_LEN || (index == MAX_VARINT_LEN - 1 && b > 1) {
        return Err("varint longer than 64 bits");
    }
    *value |= u64::from(b & 0x7f) << (7 * index);
    Ok(if b & 0x80 == 0 { Some(*value) } else { None })
}

/// Something that can be written as a response or request body: its size is known
/// up front, so it is encoded exactly once, straight into its destination (a frame
/// buffer or the shared-memory region).
pub trait Body {
    fn body_len(&self) -> usize;
    /// Writes exactly `body_len()` bytes into `out` (whose length is `body_len()`).
    fn encode_into(&self, out: &mut [u8]);
}

impl Body for [u8] {
    fn body_len(&self) -> usize {
        self.len()
    }
    fn encode_into(&self, out: &mut [u8]) {
        out.copy_from_slice(self);
    }
}

impl Body for Vec<u8> {
    fn body_len(&self) -> usize {
        self.len()
    }
    fn encode_into(&self, out: &mut [u8]) {
        out.copy_from_slice(self);
    }
}

/// A prost message as a [`Body`].
pub struct MessageBody<M>(pub M);

impl<M: prost::Message> Body for MessageBody<M> {
    fn body_len(&self) -> usize {
        self.0.encoded_len()
    }
    fn encode_into(&self, out: &mut [u8]) {
        let mut dst: &mut [u8] = out;
        self.0.encode(&mut dst).expect("the buffer is sized by encoded_len");
    }
}

/// A borrowed prost message as a [`Body`].
pub struct MessageRef<'a, M>(pub &'a M);

impl<M: prost::Message> Body for MessageRef<'_, M> {
    fn body_len(&self) -> usize {
        self.0.encoded_len()
    }
    fn encode_into(&self, out: &mut [u8]) {
        let mut dst: &mut [u8] = out;
        self.0.encode(&mut dst).expect("the buffer is sized by encoded_len");
    }
}

/// `varint(len) body`: one frame, as a single buffer (written with one syscall).
pub fn frame(body: &(impl Body + ?Sized)) -> Vec<u8> {
    let len = body.body_len();
    let mut out = Vec::with_capacity(len + MAX_VARINT_LEN);
    put_varint(&mut out, len as u64);
    let start = out.len();
    out.resize(start + len, 0);
    body.encode_into(&mut out[start..]);
    out
}

/// One complete host call as sent on the socket: the marker, then the
/// length-delimited `HostCall { call_id = 1; function = 2; request = 3 }`.
pub fn host_call_frame(call_id: u64, function: &str, request: &(impl Body + ?Sized)) -> Vec<u8> {
    let request_len = request.body_len();
    let msg_len = 1
        + varint_len(call_id)
        + 1
        + varint_len(function.len() as u64)
        + function.len()
        + 1
        + varint_len(request_len as u64)
        + request_len;
    let mut out = Vec::with_capacity(2 * MAX_VARINT_LEN + msg_len);
    put_varint(&mut out, CALL_MARKER);
    put_varint(&mut out, msg_len as u64);
    out.push(1 << 3); // call_id: field 1, varint
    put_varint(&mut out, call_id);
    out.push((2 << 3) | 2); // function: field 2, length-delimited
    put_varint(&mut out, function.len() as u64);
    out.extend_from_slice(function.as_bytes());
    out.push((3 << 3) | 2); // request: field 3, length-delimited
    put_varint(&mut out, request_len as u64);
    let start = out.len();
    out.resize(start + request_len, 0);
    request.encode_into(&mut out[start..]);
    out
}

/// `HostCall` of proto/host_api.proto (decoded only by the tests; the SDK encodes
/// calls by hand in [`host_call_frame`], without copying the request).
#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostCall {
    #[prost(uint64, tag = "1")]
    pub call_id: u64,
    #[prost(string, tag = "2")]
    pub function: String,
    #[prost(bytes = "vec", tag = "3")]
    pub request: Vec<u8>,
}

/// `HostReply` of proto/host_api.proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostReply {
    #[prost(uint64, tag = "1")]
    pub call_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub response: Vec<u8>,
    #[prost(string, tag = "3")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn varints_match_prost() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64, CALL_MARKER, u64::MAX] {
            let mut ours = Vec::new();
            put_varint(&mut ours, v);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
            assert_eq!(varint_len(v), ours.len(), "{v}");
            let mut value = 0;
            let mut decoded = None;
            for (i, b) in ours.iter().enumerate() {
                decoded = varint_step(&mut value, i, *b).unwrap();
            }
            assert_eq!(decoded, Some(v));
        }
    }

    #[test]
    fn the_call_marker_is_ten_bytes() {
        let mut m = Vec::new();
        put_varint(&mut m, CALL_MARKER);
        assert_eq!(m, [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
    }

    #[test]
    fn overlong_varints_are_rejected() {
        let mut value = 0;
        for i in 0..9 {
            assert_eq!(varint_step(&mut value, i, 0xff), Ok(None));
        }
        assert!(varint_step(&mut value, 9, 0x02).is_err(), "bit 65");
        assert!(varint_step(&mut value, 10, 0x00).is_err(), "11th byte");
    }

    #[test]
    fn host_call_frames_decode_as_host_call() {
        for (id, function, request) in [
            (1u64, "kv.KeyValueService/Lookup", b"abc".to_vec()),
            (u64::MAX, "", Vec::new()),
            (300, "f", vec![7u8; 70_000]),
        ] {
            let f = host_call_frame(id, function, &request);
            assert_eq!(&f[..10], &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
            let call = HostCall::decode_length_delimited(&f[10..]).unwrap();
            assert_eq!(call, HostCall { call_id: id, function: function.into(), request: request.clone() });
            // prost encodes the same message to the same bytes, except that it omits
            // empty fields (which decode the same).
            if !function.is_empty() && !request.is_empty() {
                assert_eq!(&f[10..], call.encode_length_delimited_to_vec().as_slice());
            }
        }
    }

    #[test]
    fn frames_of_messages_and_bytes() {
        let reply = HostReply { call_id: 9, response: b"xyz".to_vec(), error: String::new() };
        assert_eq!(frame(&MessageBody(reply.clone())), reply.encode_length_delimited_to_vec());
        assert_eq!(frame(b"hi".as_slice()), vec![2, b'h', b'i']);
        assert_eq!(frame(&Vec::new()), vec![0]);
    }
}
