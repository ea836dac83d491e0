//! `roma-byob shell`: commands-file mode and the interactive prompt (stdin piped).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn shell(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roma-byob"))
        .arg("shell")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn commands_file_loads_executes_and_shows_logs_and_metrics() {
    for mode in modes() {
        let dir = std::env::temp_dir().join(format!("roma-byob-shell-{}-{}", std::process::id(), mode.as_str()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("commands.txt");
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/sample.proto");
        std::fs::write(
            &file,
            format!(
                "# comment\nproto {proto}\nload logs {} --workers 1 --log\ntypes logs roma_byob.sample.SampleRequest roma_byob.sample.SampleResponse\nexec logs {{}}\nload primes {}\ntypes primes roma_byob.sample.SampleRequest roma_byob.sample.SampleResponse\nexec primes {{\"primeBound\": 10}}\nlist\ndelete logs\n",
                sample("log_udf").display(),
                sample("prime_sieve").display()
            ),
        )
        .unwrap();
        let (ok, out, err) = shell(&["--mode", mode.as_str(), "--commands", file.to_str().unwrap()], "");
        assert!(ok, "{out}\n{err}");
        assert!(out.contains("\"greeting\": \"Hello, world!\""), "{out}");
        assert!(out.contains("stdout: \"I am a stdout log.\\n\""), "{out}");
        assert!(out.contains("metrics: wait"), "{out}");
        assert!(out.contains("\"primeNumber\""), "{out}");
        assert!(out.contains("deleted logs"), "{out}");

        // A failing command stops the file with a non-zero exit code.
        std::fs::write(&file, "exec missing {}\nlist\n").unwrap();
        let (ok, _, err) = shell(&["--mode", mode.as_str(), "--commands", file.to_str().unwrap()], "");
        assert!(!ok);
        assert!(err.contains("nothing is loaded as \"missing\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn interactive_prompt_reads_commands_from_stdin() {
    let input = format!(
        "help\nload hi {}\nexec-raw hi \nbogus\nquit\n",
        sample("hello_world").display()
    );
    let (ok, out, _) = shell(&["--mode", "minimal"], &input);
    assert!(ok, "{out}");
    assert!(out.contains("roma> "), "{out}");
    assert!(out.contains("load NAME PATH"), "help text: {out}");
    assert!(out.contains("loaded hi as code-"), "{out}");
    // SampleResponse{greeting: "Hello, world!"} in hex.
    assert!(out.contains("0a0d48656c6c6f2c20776f726c6421"), "{out}");
    assert!(out.contains("error: unknown command \"bogus\""), "{out}");
}
