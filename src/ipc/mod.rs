//! Inter-process plumbing shared by the host engine and the runner: varint frame
//! coding, the control protocol messages and SCM_RIGHTS fd passing.

pub mod fdpass;
pub mod frame;
pub mod shm;

/// Control protocol between the host engine and the runner (proto/control.proto).
pub mod control {
    include!(concat!(env!("OUT_DIR"), "/roma_byob.control.rs"));
}
