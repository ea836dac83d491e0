//! JSON <-> protobuf through a .proto file compiled at run time (protox, pure Rust)
//! and prost-reflect.

use std::path::Path;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

/// Message types of one .proto file.
pub struct ProtoTypes {
    pool: DescriptorPool,
}

impl ProtoTypes {
    /// Compiles `file` (imports resolved relative to its directory).
    pub fn compile(file: &Path) -> Result<ProtoTypes, String> {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = file.file_name().ok_or_else(|| format!("{} is not a file", file.display()))?;
        let fds = protox::compile([name], [dir]).map_err(|e| format!("cannot compile {}: {e}", file.display()))?;
        let pool = DescriptorPool::from_file_descriptor_set(fds).map_err(|e| format!("bad descriptors: {e}"))?;
        Ok(ProtoTypes { pool })
    }

    /// Full names of every message type in the file (and its imports).
    pub fn message_names(&self) -> Vec<String> {
        self.pool.all_messages().map(|m| m.full_name().to_string()).collect()
    }

    pub fn message(&self, name: &str) -> Result<MessageDescriptor, String> {
        self.pool.get_message_by_name(name).ok_or_else(|| {
            let known: Vec<String> = self.pool.all_messages().map(|m| m.full_name().to_string()).collect();
            format!("message type {name:?} is not in the proto file; it has: {}", known.join(", "))
        })
    }
}

/// Parses JSON into the protobuf bytes of `desc`.
pub fn json_to_bytes(desc: &MessageDescriptor, json: &str) -> Result<Vec<u8>, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(desc.clone(), &mut de)
        .map_err(|e| format!("request JSON does not match {}: {e}", desc.full_name()))?;
    de.end().map_err(|e| format!("trailing characters after the request JSON: {e}"))?;
    Ok(msg.encode_to_vec())
}

/// Renders protobuf bytes of `desc` as pretty JSON.
pub fn bytes_to_json(desc: &MessageDescriptor, bytes: &[u8]) -> Result<String, String> {
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| format!("the response does not decode as {}: {e}", desc.full_name()))?;
    serde_json::to_string_pretty(&msg).map_err(|e| format!("cannot render the response as JSON: {e}"))
}
