//! Sandbox construction: namespaces and the read-only root (`rootfs`), seccomp
//! programs (`seccomp`, `policy`) and the mode-specific runner launch.

pub mod gate;
pub mod gvisor;
pub mod policy;
pub mod rootfs;
pub mod launch;
pub mod seccomp;
pub mod zygote_elf;
