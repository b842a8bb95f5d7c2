//! Runs one subprocess plugin call: the arguments as JSON on stdin, at most `max_output` bytes
//! read from stdout, a deadline after which the process (and, on Unix, its whole process group)
//! is killed, and the answer read as `{"ok": true, "result": …}` or `{"ok": false, "error": …}`.
//! Every way this can go wrong is a [`Failure`] with a sentence for the model, never a panic.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bytes of stderr kept for error messages (the end of it).
const STDERR_TAIL: usize = 2000;
/// How long to wait for the output pipes to close after the process exited: a program it
/// started in the background may keep them open.
const PIPE_GRACE: Duration = Duration::from_millis(300);

/// How to start the program.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// The program and its arguments, paths already resolved.
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_output: usize,
}

/// Why a call gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The program could not be started.
    Spawn(String),
    TimedOut(Duration),
    TooMuchOutput(usize),
    /// Exited with a non-zero status (and no `{"ok": false}` answer); the end of stderr.
    Exit {
        code: i32,
        stderr: String,
    },
    /// Killed by a signal it did not expect (a crash).
    Signal {
        signal: i32,
        stderr: String,
    },
    /// Stdout was not the expected JSON; what was wrong and the start of what it printed.
    BadOutput {
        problem: String,
        output: String,
    },
    /// The plugin answered `{"ok": false, "error": …}`.
    Reported(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with_stderr = |f: &mut std::fmt::Formatter<'_>, stderr: &str| {
            if stderr.trim().is_empty() {
                Ok(())
            } else {
                write!(f, "; its error output ends: {}", stderr.trim())
            }
        };
        match self {
            Self::Spawn(e) => write!(f, "the tool's program could not be started ({e})"),
            Self::TimedOut(d) => write!(
                f,
                "the tool did not answer within {} s and was stopped",
                d.as_secs_f64()
            ),
            Self::TooMuchOutput(limit) => write!(
                f,
                "the tool printed more than {limit} bytes and was stopped"
            ),
            Self::Exit { code, stderr } => {
                write!(f, "the tool exited with status {code}")?;
                with_stderr(f, stderr)
            }
            Self::Signal { signal, stderr } => {
                write!(
                    f,
                    "the tool crashed (killed by signal {signal}{})",
                    signal_name(*signal).map_or(String::new(), |n| format!(", {n}"))
                )?;
                with_stderr(f, stderr)
            }
            Self::BadOutput { problem, output } => write!(
                f,
                "the tool's answer is not the JSON result expected ({problem}); it printed: {output}"
            ),
            Self::Reported(e) => f.write_str(e),
        }
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// A pipe read on its own thread into a shared buffer, so that the caller can stop waiting at
/// any time and keep what was read.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    /// Set when more than the limit arrived.
    overflow: Arc<Mutex<bool>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drain {
    /// Reads `pipe` to its end. With `keep_tail`, only the last `limit` bytes are kept and
    /// overflow is not an error; otherwise reading stops at `limit` bytes and flags overflow.
    fn start(mut pipe: impl Read + Send + 'static, limit: usize, keep_tail: bool) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let overflow = Arc::new(Mutex::new(false));
        let (tx, done) = std::sync::mpsc::channel();
        let (b, o) = (buf.clone(), overflow.clone());
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Ok(mut buf) = b.lock() else { break };
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > limit {
                            if keep_tail {
                                let cut = buf.len() - limit;
                                buf.drain(..cut);
                            } else {
                                buf.truncate(limit);
                                if let Ok(mut o) = o.lock() {
                                    *o = true;
                                }
                                break;
                            }
                        }
                    }
                }
            }
            let _ = tx.send(());
        });
        Self {
            buf,
            overflow,
            done,
        }
    }

    fn overflowed(&self) -> bool {
        self.overflow.lock().map(|o| *o).unwrap_or(false)
    }

    /// Waits up to `grace` for the pipe to close, then takes what was read.
    fn finish(self, grace: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(grace);
        self.buf
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

/// Kills the process and, on Unix, every process of its group (it leads a group of its own).
fn kill(child: &mut Child) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals the process group the child leads; it
        // touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}

/// Runs one call of `spec` with `input` on stdin; the plugin's `result` value.
pub fn call(spec: &CommandSpec, input: &[u8]) -> Result<Value, Failure> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(Failure::Spawn("the command is empty".into()));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&spec.workdir)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .map_err(|e| Failure::Spawn(format!("{program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.to_vec();
        // A plugin that does not read its input must not block the call.
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let stdout = child
        .stdout
        .take()
        .map(|p| Drain::start(p, spec.max_output, false));
    let stderr = child
        .stderr
        .take()
        .map(|p| Drain::start(p, STDERR_TAIL, true));
    let start = Instant::now();
    let status: Result<ExitStatus, Failure> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => {
                kill(&mut child);
                break Err(Failure::Spawn(format!("waiting for {program}: {e}")));
            }
        }
        if stdout.as_ref().is_some_and(Drain::overflowed) {
            kill(&mut child);
            let _ = child.wait();
            break Err(Failure::TooMuchOutput(spec.max_output));
        }
        if start.elapsed() >= spec.timeout {
            kill(&mut child);
            let _ = child.wait();
            break Err(Failure::TimedOut(spec.timeout));
        }
        thread::sleep(Duration::from_millis(5));
    };
    // The reader stops at the limit, so the program may have died of SIGPIPE first.
    let overflow = stdout.as_ref().is_some_and(Drain::overflowed);
    let out = stdout.map(|d| d.finish(PIPE_GRACE)).unwrap_or_default();
    let err = stderr.map(|d| d.finish(PIPE_GRACE)).unwrap_or_default();
    let status = status?;
    if overflow {
        return Err(Failure::TooMuchOutput(spec.max_output));
    }
    let stderr = String::from_utf8_lossy(&err).into_owned();
    let answer = read_answer(&out);
    if !status.success() {
        // A plugin may report its own error and exit non-zero.
        if let Err(Failure::Reported(e)) = answer {
            return Err(Failure::Reported(e));
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return Err(Failure::Signal { signal, stderr });
            }
        }
        return Err(Failure::Exit {
            code: status.code().unwrap_or(-1),
            stderr,
        });
    }
    answer
}

/// Reads the plugin's answer from what it printed.
pub fn read_answer(out: &[u8]) -> Result<Value, Failure> {
    let shown = || crate::protocol::truncate_chars(String::from_utf8_lossy(out).trim(), 200);
    let bad = |problem: String| Failure::BadOutput {
        problem,
        output: if out.iter().all(u8::is_ascii_whitespace) {
            "nothing".to_string()
        } else {
            shown()
        },
    };
    let text = std::str::from_utf8(out).map_err(|_| bad("it is not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(bad("it printed nothing".into()));
    }
    let value: Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(bad(
            "expected an object like {\"ok\": true, \"result\": ...}".into(),
        ));
    };
    match map.get("ok") {
        Some(Value::Bool(true)) => Ok(map.remove("result").unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => Err(Failure::Reported(match map.remove("error") {
            Some(Value::String(e)) => e,
            Some(other) => other.to_string(),
            None => "the tool failed without saying why".to_string(),
        })),
        _ => Err(bad("it has no \"ok\": true or false".into())),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_ms: u64) -> CommandSpec {
        CommandSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            workdir: std::env::temp_dir(),
            env: vec![("VLAD_TEST_VAR".into(), "ü".into())],
            timeout: Duration::from_millis(timeout_ms),
            max_output: 1000,
        }
    }

    #[test]
    fn a_good_answer_gives_its_result_and_stdin_arrives() {
        let spec = sh(
            r#"read -r line; printf '{"ok": true, "result": {"got": %s, "env": "%s"}}' "$line" "$VLAD_TEST_VAR""#,
            5000,
        );
        let got = call(&spec, b"{\"a\": 1}\n");
        assert_eq!(got, Ok(serde_json::json!({"got": {"a": 1}, "env": "ü"})));
    }

    #[test]
    fn every_failure_is_a_failure() {
        let reported = call(
            &sh(
                r#"echo '{"ok": false, "error": "no clipboard"}'; exit 2"#,
                5000,
            ),
            b"",
        );
        assert_eq!(reported, Err(Failure::Reported("no clipboard".into())));

        let exit = call(&sh("echo oops >&2; exit 3", 5000), b"");
        assert!(
            matches!(&exit, Err(Failure::Exit { code: 3, stderr }) if stderr.contains("oops")),
            "{exit:?}"
        );

        let signal = call(&sh("kill -SEGV $$", 5000), b"");
        assert!(
            matches!(signal, Err(Failure::Signal { signal: 11, .. })),
            "{signal:?}"
        );
        assert!(signal.is_err_and(|e| e.to_string().contains("SIGSEGV")));

        let bad = call(&sh("echo this is not json", 5000), b"");
        assert!(
            matches!(&bad, Err(Failure::BadOutput { output, .. }) if output == "this is not json"),
            "{bad:?}"
        );
        let shape = call(&sh("echo '[1, 2]'", 5000), b"");
        assert!(matches!(shape, Err(Failure::BadOutput { .. })), "{shape:?}");
        let empty = call(&sh("true", 5000), b"");
        assert!(empty.is_err_and(|e| e.to_string().contains("printed nothing")));

        let flood = call(&sh("yes", 5000), b"");
        assert_eq!(flood, Err(Failure::TooMuchOutput(1000)));

        let missing = CommandSpec {
            argv: vec!["/nonexistent/vlad-plugin".into()],
            ..sh("", 1000)
        };
        assert!(matches!(call(&missing, b""), Err(Failure::Spawn(_))));
    }

    #[test]
    fn a_slow_tool_is_killed_with_its_children() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("child.pid");
        // The shell starts a grandchild that would hold stdout open for 30 s.
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let start = Instant::now();
        let got = call(&sh(&script, 500), b"");
        assert_eq!(got, Err(Failure::TimedOut(Duration::from_millis(500))));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
        let deadline = Instant::now() + Duration::from_secs(5);
        // Killed: gone, or a zombie until its reaper notices.
        while proc_dir.exists()
            && !std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z"))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
        let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        assert!(
            !pid.trim().is_empty() && (stat.is_empty() || stat.contains(") Z")),
            "the grandchild {pid} survived: {stat}"
        );
        Ok(())
    }
}
