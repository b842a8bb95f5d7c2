//! The adb server protocol over TCP, spoken directly: every request is a 4-hex-digit length and
//! the request text; every reply starts with `OKAY` or `FAIL` + 4-hex-digit length + message.
//!
//! Each call opens a fresh connection (the server closes it after a service anyway), so a server
//! restart between calls needs nothing from us. Every connect, read and write runs against one
//! deadline per call.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::AndroidError;

/// The port `adb` uses when `ANDROID_ADB_SERVER_PORT` is not set.
pub const DEFAULT_PORT: u16 = 5037;

/// The marker appended to every shell command to learn its exit status.
const RC_MARKER: &str = "__VLAD_RC=";

/// Where the adb server listens, and how long to wait for it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdbServer {
    host: String,
    port: u16,
    /// Limit for opening the TCP connection.
    pub connect_timeout: Duration,
    /// Limit for one host request (`host:devices`, …), connect included.
    pub request_timeout: Duration,
}

/// One device as the server lists it (`host:devices-l`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub serial: String,
    /// `device` when usable; otherwise `offline`, `unauthorized`, `no permissions …`, `recovery`, …
    pub state: String,
    pub model: Option<String>,
    pub product: Option<String>,
    pub device: Option<String>,
    pub transport_id: Option<u64>,
}

impl DeviceInfo {
    /// Whether shell commands can run on it.
    pub fn is_ready(&self) -> bool {
        self.state == "device"
    }
}

/// What a shell command printed (stdout and stderr together, `\r\n` folded to `\n`) and its
/// exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellOutput {
    pub output: String,
    pub status: i32,
}

impl ShellOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

impl Default for AdbServer {
    fn default() -> Self {
        Self::new("127.0.0.1", DEFAULT_PORT)
    }
}

impl AdbServer {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// The server `adb` itself would use: `ANDROID_ADB_SERVER_ADDRESS` (host, default
    /// 127.0.0.1) and `ANDROID_ADB_SERVER_PORT` (default 5037).
    pub fn from_env() -> Result<Self, AndroidError> {
        let address = std::env::var("ANDROID_ADB_SERVER_ADDRESS").ok();
        let port = std::env::var("ANDROID_ADB_SERVER_PORT").ok();
        Self::from_vars(address.as_deref(), port.as_deref())
    }

    /// [`AdbServer::from_env`] with the two variables' values given.
    pub fn from_vars(address: Option<&str>, port: Option<&str>) -> Result<Self, AndroidError> {
        let host = match address.map(str::trim) {
            None | Some("") => "127.0.0.1",
            Some(host) => host,
        };
        let port = match port.map(str::trim) {
            None | Some("") => DEFAULT_PORT,
            Some(text) => match text.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(AndroidError::BadAddress(format!(
                        "ANDROID_ADB_SERVER_PORT={text:?} is not a port number (1-65535)"
                    )));
                }
            },
        };
        Ok(Self::new(host, port))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The server's protocol version (`host:version`; 41 for adb 1.0.41).
    pub fn version(&self) -> Result<u32, AndroidError> {
        let request = "host:version";
        let mut conn = self.open(request, self.request_timeout)?;
        conn.request(request)?;
        let text = conn.read_length_prefixed(request)?;
        u32::from_str_radix(text.trim(), 16)
            .map_err(|_| conn.protocol(request, format!("version {text:?} is not hex")))
    }

    /// Every device the server knows, in any state.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, AndroidError> {
        let request = "host:devices-l";
        let mut conn = self.open(request, self.request_timeout)?;
        conn.request(request)?;
        let text = conn.read_length_prefixed(request)?;
        Ok(parse_devices(&text))
    }

    /// Runs `command` through the device's shell and returns its output and exit status.
    pub fn shell(
        &self,
        serial: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<ShellOutput, AndroidError> {
        let what = format!("`{command}` on {serial}");
        let service = format!("shell:{command}; echo {RC_MARKER}$?");
        let bytes = self.service(serial, &service, &what, timeout)?;
        let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
        match split_status(&text) {
            Some((output, status)) => Ok(ShellOutput { output, status }),
            None => Err(AndroidError::DeviceGone {
                serial: serial.to_owned(),
                what,
                detail: format!(
                    "the connection closed before the command finished ({} bytes of output)",
                    bytes.len()
                ),
            }),
        }
    }

    /// Runs `command` with `exec:` (no PTY, binary-safe output, no exit status) and returns
    /// everything it wrote.
    pub fn exec(
        &self,
        serial: &str,
        command: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AndroidError> {
        let what = format!("`{command}` on {serial}");
        self.service(serial, &format!("exec:{command}"), &what, timeout)
    }

    /// Binds a fresh connection to `serial`, asks for `service`, and reads until the device
    /// closes the stream.
    fn service(
        &self,
        serial: &str,
        service: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AndroidError> {
        let mut conn = self.open(what, timeout)?;
        let transport = format!("host:transport:{serial}");
        conn.send(&transport)?;
        if let Some(message) = conn.status(&transport)? {
            return Err(AndroidError::device_refused(
                serial,
                &self.address(),
                message,
            ));
        }
        conn.send(service)?;
        if let Some(message) = conn.status(service)? {
            return Err(AndroidError::Refused {
                address: self.address(),
                request: service.to_owned(),
                message,
            });
        }
        conn.read_to_end(serial)
    }

    fn open(&self, what: &str, timeout: Duration) -> Result<Conn, AndroidError> {
        let deadline = Instant::now() + timeout;
        let address = self.address();
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| {
                AndroidError::BadAddress(format!(
                    "cannot resolve adb server host {:?}: {e}",
                    self.host
                ))
            })?
            .collect();
        let mut last = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = left.min(self.connect_timeout);
            if limit.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, limit) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Conn {
                        stream,
                        deadline,
                        timeout,
                        what: what.to_owned(),
                        address,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                AndroidError::Timeout {
                    what: format!("connecting to the adb server for {what}"),
                    address,
                    seconds: self.connect_timeout.min(timeout).as_secs_f64(),
                }
            }
            Some(e) => AndroidError::NoServer {
                address,
                reason: e.to_string(),
            },
            None => AndroidError::NoServer {
                address,
                reason: "the host name resolved to no address".into(),
            },
        })
    }
}

/// One connection to the server with the call's deadline.
struct Conn {
    stream: TcpStream,
    deadline: Instant,
    timeout: Duration,
    what: String,
    address: String,
}

impl Conn {
    fn left(&self) -> Result<Duration, AndroidError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timed_out())
        } else {
            Ok(left)
        }
    }

    fn timed_out(&self) -> AndroidError {
        AndroidError::Timeout {
            what: self.what.clone(),
            address: self.address.clone(),
            seconds: self.timeout.as_secs_f64(),
        }
    }

    fn io(&self, e: std::io::Error) -> AndroidError {
        if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) {
            self.timed_out()
        } else {
            AndroidError::Io {
                what: self.what.clone(),
                address: self.address.clone(),
                source: e,
            }
        }
    }

    fn protocol(&self, request: &str, detail: String) -> AndroidError {
        AndroidError::Protocol {
            address: self.address.clone(),
            request: request.to_owned(),
            detail,
        }
    }

    fn send(&mut self, request: &str) -> Result<(), AndroidError> {
        if request.len() > 0xffff {
            return Err(self.protocol(
                &request[..40.min(request.len())],
                "request longer than 65535 bytes".into(),
            ));
        }
        let message = format!("{:04x}{request}", request.len());
        let left = self.left()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| self.io(e))?;
        self.stream
            .write_all(message.as_bytes())
            .map_err(|e| self.io(e))
    }

    /// Sends a host request and requires `OKAY`.
    fn request(&mut self, request: &str) -> Result<(), AndroidError> {
        self.send(request)?;
        match self.status(request)? {
            None => Ok(()),
            Some(message) => Err(AndroidError::Refused {
                address: self.address.clone(),
                request: request.to_owned(),
                message,
            }),
        }
    }

    /// Reads `OKAY` (None) or `FAIL` + message (Some).
    fn status(&mut self, request: &str) -> Result<Option<String>, AndroidError> {
        let mut word = [0u8; 4];
        self.read_exact(&mut word, request)?;
        match &word {
            b"OKAY" => Ok(None),
            b"FAIL" => Ok(Some(self.read_length_prefixed(request)?)),
            other => Err(self.protocol(
                request,
                format!(
                    "expected OKAY or FAIL, got {:?}",
                    String::from_utf8_lossy(other)
                ),
            )),
        }
    }

    fn read_length_prefixed(&mut self, request: &str) -> Result<String, AndroidError> {
        let mut hex = [0u8; 4];
        self.read_exact(&mut hex, request)?;
        let len = std::str::from_utf8(&hex)
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| {
                self.protocol(
                    request,
                    format!("bad length {:?}", String::from_utf8_lossy(&hex)),
                )
            })?;
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, request)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn read_exact(&mut self, buf: &mut [u8], request: &str) -> Result<(), AndroidError> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.left()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(
                        self.protocol(request, "the server closed the connection mid-reply".into())
                    );
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    /// Reads a service's stream until the device side closes it. A reset connection means the
    /// device (or the server) went away.
    fn read_to_end(&mut self, serial: &str) -> Result<Vec<u8>, AndroidError> {
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let left = self.left()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    return Err(self.timed_out());
                }
                Err(e) => {
                    return Err(AndroidError::DeviceGone {
                        serial: serial.to_owned(),
                        what: self.what.clone(),
                        detail: format!("{e} after {} bytes", out.len()),
                    });
                }
            }
        }
    }
}

/// Splits the output of `CMD; echo __VLAD_RC=$?` into the command's output and its status.
/// None when the marker is missing (the stream was cut).
fn split_status(text: &str) -> Option<(String, i32)> {
    let at = text.rfind(RC_MARKER)?;
    let status = text[at + RC_MARKER.len()..].trim().parse().ok()?;
    let output = text[..at].strip_suffix('\n').unwrap_or(&text[..at]);
    Some((output.to_owned(), status))
}

/// Parses `host:devices-l` (or `host:devices`) output: `SERIAL  STATE [key:value …]` per line.
pub(crate) fn parse_devices(text: &str) -> Vec<DeviceInfo> {
    const KEYS: [&str; 6] = [
        "usb:",
        "product:",
        "model:",
        "device:",
        "transport_id:",
        "features:",
    ];
    let mut devices = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(serial) = words.next() else { continue };
        let mut info = DeviceInfo {
            serial: serial.to_owned(),
            state: String::new(),
            model: None,
            product: None,
            device: None,
            transport_id: None,
        };
        let mut state = Vec::new();
        let mut in_fields = false;
        for word in words {
            if !in_fields && KEYS.iter().any(|k| word.starts_with(k)) {
                in_fields = true;
            }
            if !in_fields {
                state.push(word);
                continue;
            }
            if let Some((key, value)) = word.split_once(':') {
                let value = Some(value.to_owned());
                match key {
                    "model" => info.model = value,
                    "product" => info.product = value,
                    "device" => info.device = value,
                    "transport_id" => info.transport_id = word[key.len() + 1..].parse().ok(),
                    _ => {}
                }
            }
        }
        info.state = state.join(" ");
        devices.push(info);
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_l_with_odd_states() {
        let text = "emulator-5554          device product:sdk_gphone64_x86_64 model:sdk_gphone64_x86_64 device:emu64xa transport_id:1\n\
                    0123456789ABCDEF       no permissions (missing udev rules? user is in the plugdev group); see [http://developer.android.com/tools/device.html] usb:1-1\n\
                    R58M       unauthorized usb:3-2 transport_id:4\n";
        let devices = parse_devices(text);
        assert_eq!(devices.len(), 3);
        assert_eq!(devices[0].serial, "emulator-5554");
        assert!(devices[0].is_ready());
        assert_eq!(devices[0].model.as_deref(), Some("sdk_gphone64_x86_64"));
        assert_eq!(devices[0].transport_id, Some(1));
        assert!(
            devices[1]
                .state
                .starts_with("no permissions (missing udev rules?")
        );
        assert!(devices[1].state.ends_with("device.html]"));
        assert_eq!(devices[2].state, "unauthorized");
        assert_eq!(devices[2].transport_id, Some(4));
    }

    #[test]
    fn status_marker_is_split_off() {
        assert_eq!(split_status("hi\n__VLAD_RC=0\n"), Some(("hi".into(), 0)));
        assert_eq!(
            split_status("no newline__VLAD_RC=127\n"),
            Some(("no newline".into(), 127))
        );
        assert_eq!(split_status("cut off"), None);
        assert_eq!(split_status("__VLAD_RC="), None);
    }

    #[test]
    fn env_vars_choose_the_server() {
        let s = AdbServer::from_vars(None, None).unwrap();
        assert_eq!(s.address(), "127.0.0.1:5037");
        let s = AdbServer::from_vars(Some("10.0.0.2"), Some("6000")).unwrap();
        assert_eq!(s.address(), "10.0.0.2:6000");
        assert!(AdbServer::from_vars(None, Some("70000")).is_err());
        assert!(AdbServer::from_vars(None, Some("0")).is_err());
    }
}
