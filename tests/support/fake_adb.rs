//! A fake adb server with fake Android devices, for tests. It listens on a loopback port and
//! speaks the adb server protocol the real `adb` client speaks (`host:version`, `host:devices[-l]`,
//! `host[-serial:S]:features`, `host:transport*`, `host:tport:*` with the 8-byte transport id,
//! `shell:`, `exec:`), runs shell commands through a small POSIX-like word parser (quotes,
//! backslashes, `;`, `#` comments, `$?` and `$VAR` expansion, and a syntax error on unquoted
//! `& | < > ( )` and backquotes — so quoting bugs show), and emulates the commands an agent uses:
//! `input`, `screencap` (PNG and raw, 12- or 16-byte header), `monkey`, `pm`, `ime`, `settings`,
//! `am broadcast` for ADBKeyboard, `wm size`, `getprop`, `echo`.
//!
//! The screen is a home screen with app icons; tapping an icon opens the app (a text field that
//! shows what was typed), long-pressing one opens a menu, swiping left pages the home screen, keys
//! go home/back/to recents. Every command is recorded. Knobs: a delay before each answer, a device
//! that vanishes mid-command, a stalled server.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use image::{Rgb, RgbImage};
use vlad::environment::android::{ADB_KEYBOARD_IME, AdbServer, AndroidOptions};

/// The protocol version adb 1.0.41 expects (a different one makes the real client restart the
/// server).
pub const VERSION: u32 = 41;
pub const LATIN_IME: &str = "com.android.inputmethod.latin/.LatinIME";
pub const ADB_KEYBOARD_PACKAGE: &str = "com.android.adbkeyboard";

/// What the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    Home {
        page: u32,
    },
    /// An app in front, by package.
    App(String),
    Recents,
    /// The long-press menu of the app with this package.
    Menu(String),
}

/// An installed package.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub package: String,
    pub label: String,
    pub color: [u8; 3],
    /// Has a launcher activity (and an icon on the home screen).
    pub launchable: bool,
}

/// One fake device and everything it recorded.
#[derive(Debug, Clone)]
pub struct FakeDevice {
    pub serial: String,
    pub state: String,
    pub model: String,
    pub product: String,
    pub width: u32,
    pub height: u32,
    pub apps: Vec<App>,
    pub screen: Screen,
    /// The open app's text field.
    pub text: String,
    /// `settings get secure default_input_method`.
    pub ime: String,
    pub installed_imes: Vec<String>,
    pub enabled_imes: Vec<String>,
    /// Every shell/exec command, verbatim as it arrived (after `shell:`/`exec:`).
    pub commands: Vec<String>,
    /// Every `ADB_INPUT_B64` message, base64-decoded.
    pub broadcasts: Vec<String>,
    /// Every `input keyevent` code.
    pub key_events: Vec<String>,
    pub taps: Vec<(i32, i32)>,
    /// (x1, y1, x2, y2, ms).
    pub swipes: Vec<(i32, i32, i32, i32, u64)>,
    /// Every `input text` argument after `%s` handling.
    pub typed: Vec<String>,
    pub launched: Vec<String>,
    /// IME history: every value `ime set` chose.
    pub ime_history: Vec<String>,
    /// Wait this long before answering each shell/exec service.
    pub delay: Duration,
    /// The next shell/exec service writes half its output, the device leaves the server's list,
    /// and the connection closes.
    pub vanish_mid_command: bool,
    /// 12 (older Android) or 16 (with colour space) bytes of raw screencap header.
    pub raw_header: usize,
    /// Raw screencap pixel format: 1 RGBA_8888, 2 RGBX_8888, 5 BGRA_8888.
    pub raw_format: u32,
    /// Raw `screencap` prints garbage (as on devices whose raw format is odd).
    pub raw_broken: bool,
    /// Shell output goes through a PTY (`\r\n`), as on old devices.
    pub pty: bool,
    transport_id: u64,
}

impl FakeDevice {
    /// A 360x640 phone with Notes, Settings and a launcher-less service, the Latin IME, no ADBKeyboard.
    pub fn phone(serial: &str) -> Self {
        Self {
            serial: serial.to_owned(),
            state: "device".into(),
            model: "Fake_Phone".into(),
            product: "fake_product".into(),
            width: 360,
            height: 640,
            apps: vec![
                App {
                    package: "com.example.notes".into(),
                    label: "Notes".into(),
                    color: [40, 170, 80],
                    launchable: true,
                },
                App {
                    package: "com.android.settings".into(),
                    label: "Settings".into(),
                    color: [120, 120, 130],
                    launchable: true,
                },
                App {
                    package: "com.example.service".into(),
                    label: "Service".into(),
                    color: [0, 0, 0],
                    launchable: false,
                },
            ],
            screen: Screen::Home { page: 0 },
            text: String::new(),
            ime: LATIN_IME.into(),
            installed_imes: vec![LATIN_IME.into()],
            enabled_imes: vec![LATIN_IME.into()],
            commands: Vec::new(),
            broadcasts: Vec::new(),
            key_events: Vec::new(),
            taps: Vec::new(),
            swipes: Vec::new(),
            typed: Vec::new(),
            launched: Vec::new(),
            ime_history: Vec::new(),
            delay: Duration::ZERO,
            vanish_mid_command: false,
            raw_header: 16,
            raw_format: 1,
            raw_broken: false,
            pty: false,
            transport_id: 0,
        }
    }

    /// Installs ADBKeyboard (installed, not enabled, not current — as after `adb install`).
    pub fn with_adb_keyboard(mut self) -> Self {
        self.installed_imes.push(ADB_KEYBOARD_IME.into());
        self.apps.push(App {
            package: ADB_KEYBOARD_PACKAGE.into(),
            label: "ADB Keyboard".into(),
            color: [0, 0, 0],
            launchable: false,
        });
        self
    }

    /// Where the icon of the `index`-th launchable app is on the home screen.
    pub fn icon_rect(&self, package: &str) -> Option<(u32, u32, u32, u32)> {
        let i = self
            .apps
            .iter()
            .filter(|a| a.launchable)
            .position(|a| a.package == package)? as u32;
        Some((30 + (i % 3) * 110, 80 + (i / 3) * 120, 80, 80))
    }

    /// The centre of an app's icon.
    pub fn icon_center(&self, package: &str) -> Option<(i32, i32)> {
        let (x, y, w, h) = self.icon_rect(package)?;
        Some(((x + w / 2) as i32, (y + h / 2) as i32))
    }

    fn icon_at(&self, x: i32, y: i32) -> Option<String> {
        self.apps.iter().filter(|a| a.launchable).find_map(|a| {
            let (rx, ry, w, h) = self.icon_rect(&a.package)?;
            let inside =
                x >= rx as i32 && y >= ry as i32 && x < (rx + w) as i32 && y < (ry + h) as i32;
            inside.then(|| a.package.clone())
        })
    }

    /// The screen as it looks now.
    pub fn render(&self) -> RgbImage {
        let (w, h) = (self.width, self.height);
        let mut img = RgbImage::new(w, h);
        let fill = |img: &mut RgbImage, x: u32, y: u32, rw: u32, rh: u32, c: [u8; 3]| {
            for yy in y..(y + rh).min(h) {
                for xx in x..(x + rw).min(w) {
                    img.put_pixel(xx, yy, Rgb(c));
                }
            }
        };
        match &self.screen {
            Screen::Home { .. } | Screen::Menu(_) => {
                let page = if let Screen::Home { page } = &self.screen {
                    *page
                } else {
                    0
                };
                let bg = if page == 0 {
                    [30, 60, 110]
                } else {
                    [60, 110, 30]
                };
                fill(&mut img, 0, 0, w, h, bg);
                if page == 0 {
                    for app in self.apps.iter().filter(|a| a.launchable) {
                        if let Some((x, y, rw, rh)) = self.icon_rect(&app.package) {
                            fill(&mut img, x, y, rw, rh, app.color);
                        }
                    }
                }
                if let Screen::Menu(package) = &self.screen
                    && let Some((x, y, _, rh)) = self.icon_rect(package)
                {
                    fill(&mut img, x, y + rh, 160, 60, [250, 250, 250]);
                }
            }
            Screen::App(package) => {
                let color = self
                    .apps
                    .iter()
                    .find(|a| &a.package == package)
                    .map_or([0, 0, 0], |a| a.color);
                fill(&mut img, 0, 0, w, h, [255, 255, 255]);
                fill(&mut img, 0, 0, w, 56, color);
                fill(&mut img, 16, 80, w - 32, 48, [230, 230, 230]);
                for (i, c) in self.text.chars().enumerate() {
                    let x = 20 + 8 * i as u32;
                    let ink = if c.is_ascii() {
                        [20, 20, 20]
                    } else {
                        [200, 20, 20]
                    };
                    fill(&mut img, x, 94, 6, 20, ink);
                }
            }
            Screen::Recents => {
                fill(&mut img, 0, 0, w, h, [128, 128, 128]);
                fill(&mut img, 40, 100, w - 80, h - 200, [200, 200, 200]);
            }
        }
        img
    }

    /// `screencap -p`.
    pub fn png(&self) -> Vec<u8> {
        let rgba = image::DynamicImage::ImageRgb8(self.render()).to_rgba8();
        let mut out = std::io::Cursor::new(Vec::new());
        // Encoding an in-memory RGBA image to PNG cannot fail.
        let _ = rgba.write_to(&mut out, image::ImageFormat::Png);
        out.into_inner()
    }

    /// Raw `screencap`.
    pub fn raw(&self) -> Vec<u8> {
        if self.raw_broken {
            return b"screencap: unsupported pixel format\n".to_vec();
        }
        let img = self.render();
        let mut out = Vec::new();
        out.extend_from_slice(&self.width.to_le_bytes());
        out.extend_from_slice(&self.height.to_le_bytes());
        out.extend_from_slice(&self.raw_format.to_le_bytes());
        if self.raw_header == 16 {
            out.extend_from_slice(&1u32.to_le_bytes()); // sRGB
        }
        for p in img.pixels() {
            let [r, g, b] = p.0;
            match self.raw_format {
                2 => out.extend_from_slice(&[r, g, b, 0]),
                5 => out.extend_from_slice(&[b, g, r, 255]),
                _ => out.extend_from_slice(&[r, g, b, 255]),
            }
        }
        out
    }

    fn tap(&mut self, x: i32, y: i32) {
        self.taps.push((x, y));
        match &self.screen {
            Screen::Home { page: 0 } => {
                if let Some(package) = self.icon_at(x, y) {
                    self.open(&package);
                }
            }
            Screen::Menu(_) | Screen::Recents => self.screen = Screen::Home { page: 0 },
            _ => {}
        }
    }

    fn swipe(&mut self, x1: i32, y1: i32, x2: i32, y2: i32, ms: u64) {
        self.swipes.push((x1, y1, x2, y2, ms));
        let held = (x1, y1) == (x2, y2) && ms >= 500;
        match self.screen.clone() {
            Screen::Home { page: 0 } if held => {
                if let Some(package) = self.icon_at(x1, y1) {
                    self.screen = Screen::Menu(package);
                }
            }
            Screen::Home { page } if x2 - x1 < -100 => {
                self.screen = Screen::Home { page: page + 1 }
            }
            Screen::Home { page } if x2 - x1 > 100 => {
                self.screen = Screen::Home {
                    page: page.saturating_sub(1),
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, package: &str) {
        self.screen = Screen::App(package.to_owned());
        self.text.clear();
        self.launched.push(package.to_owned());
    }

    fn key(&mut self, code: &str) -> bool {
        let code = match code {
            "3" => "KEYCODE_HOME",
            "4" => "KEYCODE_BACK",
            "66" => "KEYCODE_ENTER",
            "187" => "KEYCODE_APP_SWITCH",
            other => other,
        };
        if !code.starts_with("KEYCODE_") {
            return false;
        }
        self.key_events.push(code.to_owned());
        let in_app = matches!(self.screen, Screen::App(_));
        match code {
            "KEYCODE_HOME" => self.screen = Screen::Home { page: 0 },
            "KEYCODE_BACK" => self.screen = Screen::Home { page: 0 },
            "KEYCODE_APP_SWITCH" => self.screen = Screen::Recents,
            "KEYCODE_ENTER" if in_app => self.text.push('\n'),
            "KEYCODE_TAB" if in_app => self.text.push('\t'),
            "KEYCODE_DEL" if in_app => {
                self.text.pop();
            }
            _ => {}
        }
        true
    }

    fn type_text(&mut self, text: &str) {
        if matches!(self.screen, Screen::App(_)) {
            self.text.push_str(text);
        }
    }

    /// Runs one simple command; returns (output, status).
    fn run(&mut self, argv: &[String]) -> (Vec<u8>, i32) {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let ok = |s: &str| (s.as_bytes().to_vec(), 0);
        match args.as_slice() {
            [] => (Vec::new(), 0),
            ["echo", rest @ ..] => ok(&format!("{}\n", rest.join(" "))),
            ["true"] => (Vec::new(), 0),
            ["false"] => (Vec::new(), 1),
            ["screencap", "-p"] => (self.png(), 0),
            ["screencap"] => (self.raw(), 0),
            ["wm", "size"] => ok(&format!("Physical size: {}x{}\n", self.width, self.height)),
            ["getprop", "ro.product.model"] => ok(&format!("{}\n", self.model)),
            ["input", "tap", x, y] => match (x.parse(), y.parse()) {
                (Ok(x), Ok(y)) => {
                    self.tap(x, y);
                    (Vec::new(), 0)
                }
                _ => ok("Error: NumberFormatException\n"),
            },
            ["input", "swipe", x1, y1, x2, y2, rest @ ..] => {
                let nums: Vec<Option<i32>> =
                    [x1, y1, x2, y2].iter().map(|s| s.parse().ok()).collect();
                let ms = rest.first().map_or(Some(300), |s| s.parse().ok());
                match (nums.as_slice(), ms) {
                    ([Some(a), Some(b), Some(c), Some(d)], Some(ms)) => {
                        self.swipe(*a, *b, *c, *d, ms);
                        (Vec::new(), 0)
                    }
                    _ => ok("Error: NumberFormatException\n"),
                }
            }
            ["input", "keyevent", codes @ ..] if !codes.is_empty() => {
                for code in codes {
                    if !self.key(code) {
                        return ok(&format!("Error: Unknown keycode {code}\n"));
                    }
                }
                (Vec::new(), 0)
            }
            ["input", "text", text] => {
                let typed = android_input_text(text);
                self.typed.push(typed.clone());
                self.type_text(&typed);
                (Vec::new(), 0)
            }
            ["input", ..] => (b"Error: Unknown command or bad arguments\n".to_vec(), 1),
            [
                "monkey",
                "-p",
                package,
                "-c",
                "android.intent.category.LAUNCHER",
                "1",
            ] => {
                let launchable = self
                    .apps
                    .iter()
                    .any(|a| a.package == *package && a.launchable);
                if launchable {
                    self.open(package);
                    ok(&format!(
                        "  bash arg: -p\n  bash arg: {package}\n  bash arg: -c\n  bash arg: android.intent.category.LAUNCHER\n  bash arg: 1\nargs: [-p, {package}, -c, android.intent.category.LAUNCHER, 1]\nEvents injected: 1\n## Network stats: elapsed time=12ms (0ms mobile, 0ms wifi, 12ms not connected)\n"
                    ))
                } else {
                    (
                        b"** No activities found to run, monkey aborted.\n".to_vec(),
                        252,
                    )
                }
            }
            ["pm", "list", "packages", filter @ ..] => {
                let filter = filter.first().copied().unwrap_or("");
                let list: String = self
                    .apps
                    .iter()
                    .filter(|a| a.package.contains(filter))
                    .map(|a| format!("package:{}\n", a.package))
                    .collect();
                ok(&list)
            }
            ["settings", "get", "secure", "default_input_method"] => ok(&format!("{}\n", self.ime)),
            ["settings", "put", "secure", "default_input_method", value] => {
                self.ime = value.to_string();
                (Vec::new(), 0)
            }
            ["ime", "list", "-s"] => ok(&self
                .enabled_imes
                .iter()
                .map(|i| format!("{i}\n"))
                .collect::<String>()),
            ["ime", "list", "-a", "-s"] => ok(&self
                .installed_imes
                .iter()
                .map(|i| format!("{i}\n"))
                .collect::<String>()),
            ["ime", "enable", id] => {
                if !self.installed_imes.iter().any(|i| i == id) {
                    return (
                        format!("Unknown input method {id} cannot be enabled for user #0\n")
                            .into_bytes(),
                        255,
                    );
                }
                if !self.enabled_imes.iter().any(|i| i == id) {
                    self.enabled_imes.push(id.to_string());
                }
                ok(&format!("Input method {id}: now enabled for user #0\n"))
            }
            ["ime", "disable", id] => {
                self.enabled_imes.retain(|i| i != id);
                if self.ime == *id {
                    self.ime = self
                        .enabled_imes
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "null".into());
                }
                ok(&format!("Input method {id}: now disabled for user #0\n"))
            }
            ["ime", "set", id] => {
                if !self.enabled_imes.iter().any(|i| i == id) {
                    return (
                        format!("Unknown input method {id} cannot be selected for user #0\n")
                            .into_bytes(),
                        255,
                    );
                }
                self.ime = id.to_string();
                self.ime_history.push(id.to_string());
                ok(&format!("Input method {id} selected for user #0\n"))
            }
            ["am", "broadcast", "-a", action, "--es", "msg", payload] => {
                let mut out =
                    format!("Broadcasting: Intent {{ act={action} flg=0x400000 (has extras) }}\n");
                if *action == "ADB_INPUT_B64" && self.ime == ADB_KEYBOARD_IME {
                    // ADBKeyboard's receiver exists only while it is the current IME.
                    match base64::engine::general_purpose::STANDARD.decode(payload) {
                        Ok(bytes) => {
                            let text = String::from_utf8_lossy(&bytes).into_owned();
                            self.broadcasts.push(text.clone());
                            self.type_text(&text);
                        }
                        Err(_) => out.push_str("AdbIME: bad base64\n"),
                    }
                }
                out.push_str("Broadcast completed: result=0\n");
                ok(&out)
            }
            [name, ..] => (
                format!("/system/bin/sh: {name}: not found\n").into_bytes(),
                127,
            ),
        }
    }

    /// Runs a command line the way `sh -c` would, as far as this fake goes.
    pub fn run_line(&mut self, line: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut status = 0;
        let statements = match split_statements(line) {
            Ok(s) => s,
            Err(e) => {
                return format!("/system/bin/sh: syntax error: {e}\n").into_bytes();
            }
        };
        for words in statements {
            // An unquoted word that expands to nothing disappears, as in sh.
            let argv: Vec<String> = words
                .iter()
                .map(|w| (expand(w, status), w.1))
                .filter(|(s, quoted)| *quoted || !s.is_empty())
                .map(|(s, _)| s)
                .collect();
            let (o, s) = self.run(&argv);
            out.extend_from_slice(&o);
            status = s;
        }
        out
    }
}

/// `input text`'s `%s` handling, as Android's `InputShellCommand.sendText` does it.
fn android_input_text(text: &str) -> String {
    let mut buf: Vec<char> = text.chars().collect();
    let mut escape = false;
    let mut i = 0usize;
    while i < buf.len() {
        if escape {
            escape = false;
            if buf[i] == 's' {
                buf[i] = ' ';
                buf.remove(i - 1);
                i -= 1;
            }
        }
        if buf[i] == '%' {
            escape = true;
        }
        i += 1;
    }
    buf.into_iter().collect()
}

/// A word before expansion: parts that expand (`$x` outside single quotes) and parts that don't.
#[derive(Debug, Clone, Default)]
struct Word(Vec<(String, Kind)>, bool);

/// Where a piece of a word came from: quoted literally, unquoted, or inside double quotes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Literal,
    Bare,
    Double,
}

fn expand(word: &Word, status: i32) -> String {
    let mut out = String::new();
    for (text, kind) in &word.0 {
        if *kind == Kind::Literal {
            out.push_str(text);
            continue;
        }
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            match chars.peek() {
                Some('?') => {
                    chars.next();
                    out.push_str(&status.to_string());
                }
                Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                    // Unknown variables expand to nothing, as in sh.
                    while chars
                        .peek()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                    {
                        chars.next();
                    }
                }
                _ => out.push('$'),
            }
        }
    }
    out
}

/// Splits a command line into statements (`;`) of words, handling quotes and backslashes.
fn split_statements(line: &str) -> Result<Vec<Vec<Word>>, String> {
    let mut statements = Vec::new();
    let mut words: Vec<Word> = Vec::new();
    let mut word = Word::default();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let push = |word: &mut Word, s: &str, kind: Kind| match word.0.last_mut() {
        Some((last, k)) if *k == kind && kind != Kind::Double => last.push_str(s),
        _ => word.0.push((s.to_owned(), kind)),
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            ';' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                statements.push(std::mem::take(&mut words));
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '\'' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => s.push(c),
                        None => return Err("unterminated '".into()),
                    }
                }
                push(&mut word, &s, Kind::Literal);
                word.1 = true;
                in_word = true;
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => {
                                push(&mut word, &std::mem::take(&mut s), Kind::Double);
                                push(&mut word, &c.to_string(), Kind::Literal);
                            }
                            Some(c) => {
                                s.push('\\');
                                s.push(c);
                            }
                            None => return Err("unterminated \"".into()),
                        },
                        Some('`') => return Err("command substitution".into()),
                        Some('$') if chars.peek() == Some(&'(') => {
                            return Err("command substitution".into());
                        }
                        Some(c) => s.push(c),
                        None => return Err("unterminated \"".into()),
                    }
                }
                push(&mut word, &s, Kind::Double);
                word.1 = true;
                in_word = true;
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    push(&mut word, &c.to_string(), Kind::Literal);
                    in_word = true;
                }
            }
            '&' | '|' | '<' | '>' | '(' | ')' | '`' => {
                return Err(format!(
                    "unexpected {c:?} (the fake shell runs only simple commands)"
                ));
            }
            '$' if chars.peek() == Some(&'(') => return Err("command substitution".into()),
            c => {
                push(&mut word, &c.to_string(), Kind::Bare);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    statements.push(words);
    Ok(statements)
}

struct Inner {
    devices: Vec<FakeDevice>,
    /// Every request, in order of arrival.
    requests: Vec<String>,
    /// Wait this long before answering any request (a stalled server).
    host_delay: Duration,
    next_transport_id: u64,
}

/// A running fake adb server. Dropping it stops it and frees the port.
pub struct FakeAdb {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeAdb {
    /// Starts a server on a free loopback port.
    pub fn start(devices: Vec<FakeDevice>) -> std::io::Result<Self> {
        Self::start_on(0, devices)
    }

    /// Starts a server on `port` (0: any free port).
    pub fn start_on(port: u16, devices: Vec<FakeDevice>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            devices: Vec::new(),
            requests: Vec::new(),
            host_delay: Duration::ZERO,
            next_transport_id: 1,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (inner2, stop2) = (inner.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let inner = inner2.clone();
                    std::thread::spawn(move || serve(stream, inner));
                }
            }
        });
        let server = Self {
            addr,
            inner,
            stop,
            accept: Some(accept),
        };
        for d in devices {
            server.add_device(d);
        }
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// An [`AdbServer`] pointed at this fake, with short timeouts.
    pub fn server(&self) -> AdbServer {
        let mut s = AdbServer::new("127.0.0.1", self.port());
        s.connect_timeout = Duration::from_secs(2);
        s.request_timeout = Duration::from_secs(3);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn add_device(&self, mut device: FakeDevice) {
        let mut inner = self.lock();
        device.transport_id = inner.next_transport_id;
        inner.next_transport_id += 1;
        inner.devices.push(device);
    }

    pub fn remove_device(&self, serial: &str) -> Option<FakeDevice> {
        let mut inner = self.lock();
        let i = inner.devices.iter().position(|d| d.serial == serial)?;
        Some(inner.devices.remove(i))
    }

    /// A snapshot of a device. Panics (test code) when it is not there.
    pub fn device(&self, serial: &str) -> FakeDevice {
        self.lock()
            .devices
            .iter()
            .find(|d| d.serial == serial)
            .cloned()
            .unwrap_or_else(|| panic!("the fake has no device {serial}"))
    }

    /// Changes a device. Panics (test code) when it is not there.
    pub fn with_device<R>(&self, serial: &str, f: impl FnOnce(&mut FakeDevice) -> R) -> R {
        let mut inner = self.lock();
        let d = inner
            .devices
            .iter_mut()
            .find(|d| d.serial == serial)
            .unwrap_or_else(|| panic!("the fake has no device {serial}"));
        f(d)
    }

    /// Every request the server received (`host:…`, `shell:…`, `exec:…`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// A device's shell/exec commands.
    pub fn commands(&self, serial: &str) -> Vec<String> {
        self.device(serial).commands
    }

    pub fn set_host_delay(&self, delay: Duration) {
        self.lock().host_delay = delay;
    }
}

impl Drop for FakeAdb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and the listener closes.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

/// Options for tests: short timeouts, no IME settle pause.
pub fn fast_options() -> AndroidOptions {
    AndroidOptions {
        command_timeout: Duration::from_secs(3),
        screenshot_timeout: Duration::from_secs(3),
        ime_settle: Duration::ZERO,
        ..AndroidOptions::default()
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let len = usize::from_str_radix(std::str::from_utf8(&len).ok()?, 16).ok()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

fn okay_with(stream: &mut TcpStream, body: &str) {
    let _ = stream.write_all(format!("OKAY{:04x}{body}", body.len()).as_bytes());
}

fn fail(stream: &mut TcpStream, message: &str) {
    let _ = stream.write_all(format!("FAIL{:04x}{message}", message.len()).as_bytes());
}

/// Picks the device for a transport request; Err is the server's FAIL message.
fn pick(inner: &Inner, selector: &str) -> Result<(String, u64), String> {
    let ready = |d: &&FakeDevice| d.state == "device";
    let found: Vec<&FakeDevice> = match selector {
        "any" | "usb" | "local" => inner.devices.iter().filter(ready).collect(),
        s if s.starts_with("serial:") => inner
            .devices
            .iter()
            .filter(|d| d.serial == s[7..])
            .collect(),
        s if s.starts_with("id:") => inner
            .devices
            .iter()
            .filter(|d| d.transport_id.to_string() == s[3..])
            .collect(),
        _ => return Err(format!("unknown transport selector {selector}")),
    };
    match found.as_slice() {
        [] if selector.starts_with("serial:") => Err(format!("device '{}' not found", &selector[7..])),
        [] => Err("no devices/emulators found".into()),
        [d] if d.state == "offline" => Err("device offline".into()),
        [d] if d.state == "unauthorized" => Err("device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nTry 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device.".into()),
        [d] => Ok((d.serial.clone(), d.transport_id)),
        _ => Err("more than one device/emulator".into()),
    }
}

fn device_list(inner: &Inner, long: bool) -> String {
    inner
        .devices
        .iter()
        .map(|d| {
            if long {
                format!(
                    "{:<22} {} product:{} model:{} device:{} transport_id:{}\n",
                    d.serial, d.state, d.product, d.model, d.product, d.transport_id
                )
            } else {
                format!("{}\t{}\n", d.serial, d.state)
            }
        })
        .collect()
}

/// Serves one client connection.
fn serve(mut stream: TcpStream, inner: Arc<Mutex<Inner>>) {
    let mut bound: Option<String> = None;
    loop {
        let Some(request) = read_request(&mut stream) else {
            return;
        };
        let delay = {
            let mut g = lock(&inner);
            g.requests.push(request.clone());
            g.host_delay
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if let Some(serial) = bound.clone() {
            serve_service(&mut stream, &inner, &serial, &request);
            return;
        }
        let g = lock(&inner);
        let selector = request
            .strip_prefix("host:transport:")
            .map(|s| format!("serial:{s}"))
            .or_else(|| {
                request
                    .strip_prefix("host:transport-id:")
                    .map(|s| format!("id:{s}"))
            })
            .or_else(|| request.strip_prefix("host:transport-").map(str::to_owned))
            .map(|s| (s, false))
            .or_else(|| {
                request
                    .strip_prefix("host:tport:")
                    .map(|s| (s.to_owned(), true))
            });
        if let Some((selector, tport)) = selector {
            match pick(&g, &selector) {
                Ok((serial, id)) => {
                    drop(g);
                    let _ = stream.write_all(b"OKAY");
                    if tport {
                        let _ = stream.write_all(&id.to_le_bytes());
                    }
                    bound = Some(serial);
                    continue;
                }
                Err(message) => {
                    drop(g);
                    fail(&mut stream, &message);
                    return;
                }
            }
        }
        match request.as_str() {
            "host:version" => okay_with(&mut stream, &format!("{VERSION:04x}")),
            "host:devices" => okay_with(&mut stream, &device_list(&g, false)),
            "host:devices-l" => okay_with(&mut stream, &device_list(&g, true)),
            "host:features" | "host:host-features" => okay_with(&mut stream, ""),
            "host:kill" => {
                let _ = stream.write_all(b"OKAY");
            }
            r if r.starts_with("host-serial:") => {
                // host-serial:SERIAL:features / :get-state (the serial may contain ':').
                let rest = &r["host-serial:".len()..];
                match rest.rsplit_once(':') {
                    Some((serial, query)) if g.devices.iter().any(|d| d.serial == serial) => {
                        let state = g
                            .devices
                            .iter()
                            .find(|d| d.serial == serial)
                            .map(|d| d.state.clone());
                        match query {
                            "features" => okay_with(&mut stream, ""),
                            "get-state" => okay_with(&mut stream, &state.unwrap_or_default()),
                            "get-serialno" => okay_with(&mut stream, serial),
                            _ => fail(&mut stream, "unknown host service"),
                        }
                    }
                    Some((serial, _)) => fail(&mut stream, &format!("device '{serial}' not found")),
                    None => fail(&mut stream, "unknown host service"),
                }
            }
            _ => fail(&mut stream, "unknown host service"),
        }
        return;
    }
}

/// Runs a `shell:` or `exec:` service on a bound connection.
fn serve_service(stream: &mut TcpStream, inner: &Mutex<Inner>, serial: &str, request: &str) {
    let (command, exec) = if let Some(c) = request.strip_prefix("shell:") {
        (c, false)
    } else if let Some(c) = request.strip_prefix("exec:") {
        (c, true)
    } else {
        fail(stream, &format!("unsupported service {request}"));
        return;
    };
    let delay = match lock(inner).devices.iter().find(|d| d.serial == serial) {
        Some(d) => d.delay,
        None => return,
    };
    let _ = stream.write_all(b"OKAY");
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let (output, vanish) = {
        let mut g = lock(inner);
        let Some(i) = g.devices.iter().position(|d| d.serial == serial) else {
            return;
        };
        let d = &mut g.devices[i];
        d.commands.push(command.to_owned());
        let mut output = d.run_line(command);
        if d.pty && !exec {
            output = String::from_utf8_lossy(&output)
                .replace('\n', "\r\n")
                .into_bytes();
        }
        let vanish = std::mem::take(&mut d.vanish_mid_command);
        if vanish {
            g.devices.remove(i);
        }
        (output, vanish)
    };
    if vanish {
        let _ = stream.write_all(&output[..output.len() / 2]);
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let _ = stream.write_all(&output);
}
