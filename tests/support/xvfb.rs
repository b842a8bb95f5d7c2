//! Test support: a private X server (Xvfb) with a window manager (openbox), started per test on a
//! free display number and killed on drop, so desktop tests need no global setup.
//!
//! Xvfb missing is a test failure with the package to install, never a silent skip.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// xcap reads the display from the process environment only, so tests that drive the library
/// in-process run one at a time, each holding this lock while DISPLAY names its server.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the lock that serialises desktop tests of one test binary.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed: the desktop tests need it. Install the Debian package \
         `{package}` (scripts/install-deps.sh does: apt-get install xvfb xauth x11-utils \
         x11-xserver-utils openbox python3-tk zenity fonts-wqy-zenhei)"
    );
}

/// The Python that has Tk (Debian's python3-tk is for /usr/bin/python3, not a pyenv one).
pub fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        system
    } else {
        PathBuf::from("python3")
    }
}

pub struct Xvfb {
    /// e.g. `:42`
    pub display: String,
    pub width: u32,
    pub height: u32,
    server: Child,
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Xvfb {
    /// Starts `Xvfb -screen 0 WxHx24 -noreset` on a display number it picks itself
    /// (`-displayfd`), and waits until it accepts clients.
    pub fn start(width: u32, height: u32) -> Self {
        require("Xvfb", "xvfb");
        require("xprop", "x11-utils");
        let mut server = Command::new("Xvfb")
            .args(["-displayfd", "1", "-screen", "0"])
            .arg(format!("{width}x{height}x24"))
            .args(["-noreset", "-nolisten", "tcp"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Xvfb: {e}"));
        // Xvfb writes its display number to -displayfd once it is ready.
        let stdout = server
            .stdout
            .take()
            .unwrap_or_else(|| panic!("no Xvfb stdout"));
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let number = line.trim().to_string();
        if read.is_err() || number.is_empty() {
            let _ = server.kill();
            panic!("Xvfb did not report a display number (is another X server misbehaving?)");
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self {
            display: format!(":{number}"),
            width,
            height,
            server,
            children: Vec::new(),
            dir,
        }
    }

    /// [`Xvfb::start`] plus openbox (an EWMH window manager: window listing needs one).
    pub fn with_wm(width: u32, height: u32) -> Self {
        require("openbox", "openbox");
        let mut x = Self::start(width, height);
        // A valid, minimal configuration: openbox's defaults, and nothing from the user's home
        // (an empty or missing file makes openbox show an error dialog on the screen).
        let rc = x.path("openbox-rc.xml");
        std::fs::write(
            &rc,
            "<?xml version=\"1.0\"?>\n<openbox_config xmlns=\"http://openbox.org/3.4/rc\">\n\
             <focus><focusNew>yes</focusNew><followMouse>no</followMouse></focus>\n\
             </openbox_config>\n",
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", rc.display()));
        let wm = x
            .command("openbox")
            .arg("--sm-disable")
            .arg("--config-file")
            .arg(&rc)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start openbox: {e}"));
        x.children.push(wm);
        x.wait_until(
            "openbox to manage the screen",
            Duration::from_secs(10),
            |x| {
                let out = x.output("xprop", &["-root", "_NET_SUPPORTING_WM_CHECK"]);
                String::from_utf8_lossy(&out.stdout).contains("window id")
            },
        );
        x
    }

    /// A command with DISPLAY set to this server.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("DISPLAY", &self.display)
            .env("NO_AT_BRIDGE", "1")
            .env_remove("WAYLAND_DISPLAY");
        c
    }

    /// Runs a command to completion.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Runs a command and asserts it succeeded.
    pub fn run(&self, program: &str, args: &[&str]) {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a program that lives as long as this server (killed on drop).
    pub fn spawn(&mut self, mut command: Command) -> u32 {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Points this process's DISPLAY at the server (call with [`serial`] held).
    pub fn use_here(&self) {
        // SAFETY: the desktop tests of a binary run one at a time under `serial()`, and all env
        // access in this process goes through std's environment lock.
        unsafe {
            std::env::set_var("DISPLAY", &self.display);
            std::env::remove_var("WAYLAND_DISPLAY");
        }
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Reads a JSON state file an app writes (None while it does not exist or is half-written).
pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}
