//! gVisor-specific behaviour: runsc missing or too old, and gvisor-debug logs.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use roma_byob::{Code, Config, Engine, Mode};

#[test]
fn missing_runsc_says_how_to_install_it() {
    let config = Config { mode: Mode::Gvisor, runsc_path: Some("/nonexistent/runsc".into()), ..Default::default() };
    let err = Engine::new(config).err().expect("no engine without runsc");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("apt-get install -y runsc"), "{err}");
}

#[test]
fn too_old_runsc_is_refused() {
    let dir = std::env::temp_dir().join(format!("roma-byob-fake-runsc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("runsc");
    std::fs::write(&fake, "#!/bin/sh\necho 'runsc version 0.0~20200101.0'\necho 'spec: 1.0.1'\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = Config { mode: Mode::Gvisor, runsc_path: Some(fake), ..Default::default() };
    let err = Engine::new(config).err().expect("no engine with an old runsc");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("too old"), "{err}");
}

#[test]
fn gvisor_debug_keeps_strace_logs_and_says_where() {
    if !modes().contains(&Mode::Gvisor) {
        return; // modes() printed the skip reason.
    }
    let e = Engine::new(Config { mode: Mode::GvisorDebug, ..Default::default() }).unwrap();
    let dir = e.debug_log_dir().expect("gvisor-debug reports its log directory").to_path_buf();
    let t = load(&e, "hello_world", 1);
    assert_eq!(hello(&e, &t).unwrap(), "Hello, world!");
    e.shutdown();
    let mut strace = false;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains("boot") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            strace |= text.contains("execveat") || text.contains("write(");
        }
    }
    assert!(strace, "the boot log in {} holds strace lines", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
}
