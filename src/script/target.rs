//! Starting and stopping what a test runs against: a desktop app launched from the file's
//! `command` (waiting for its window), or an Android app restarted on its device.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::action::Action;
use crate::agent::{self, Profile};
use crate::environment::android::AndroidDevice;
use crate::environment::desktop;
use crate::environment::{Environment, Outcome};

use super::file::{Capture, Target};

/// A running target: the environment to act on, and the process to stop afterwards.
pub struct Launched {
    pub env: Box<dyn Environment>,
    /// The agent profile of this kind of target, as TOML (kept with each trajectory).
    pub profile_toml: String,
    child: Option<Child>,
    window: Option<String>,
}

fn window_matches(title: &str, wanted: &str) -> bool {
    title == wanted || title.to_lowercase().contains(&wanted.to_lowercase())
}

fn window_open(wanted: &str) -> bool {
    desktop::windows()
        .map(|list| list.iter().any(|w| window_matches(&w.title, wanted)))
        .unwrap_or(false)
}

fn profile_toml(name: &str) -> Result<String, String> {
    Profile::load(name)
        .and_then(|p| p.to_toml())
        .map_err(|e| e.to_string())
}

/// Starts `target`; `settle` is how long to let a launched app draw before the first step.
pub fn launch(target: &Target, settle: Duration) -> Result<Launched, String> {
    match target {
        Target::Desktop {
            command,
            window,
            capture,
            monitor,
            launch_timeout,
            dir,
        } => {
            desktop::check_display().map_err(|e| e.to_string())?;
            if let Some(title) = window
                && command.is_some()
                && window_open(title)
            {
                return Err(format!(
                    "a window matching {title:?} is already open before the app was started; \
                     close it, or the test would act on the wrong window"
                ));
            }
            let mut child = match command {
                Some(argv) => {
                    let (program, args) = argv.split_first().ok_or("target.command is empty")?;
                    let child = Command::new(program)
                        .args(args)
                        .current_dir(dir)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .map_err(|e| {
                            format!(
                                "cannot start {program:?} (in {}): {e}; check target.command",
                                dir.display()
                            )
                        })?;
                    Some(child)
                }
                None => None,
            };
            if let Some(title) = window {
                let start = Instant::now();
                loop {
                    if window_open(title) {
                        break;
                    }
                    if let Some(c) = child.as_mut()
                        && let Ok(Some(status)) = c.try_wait()
                    {
                        return Err(format!(
                            "the app exited ({status}) before a window {title:?} appeared"
                        ));
                    }
                    if start.elapsed().as_secs_f64() > *launch_timeout {
                        if let Some(mut c) = child {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                        let open = desktop::windows()
                            .map(|l| {
                                l.iter()
                                    .map(|w| format!("{:?}", w.title))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .unwrap_or_default();
                        return Err(format!(
                            "no window {title:?} appeared within {launch_timeout} s (open windows: {open}); \
                             check target.window or raise target.launch_timeout"
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if child.is_some() {
                std::thread::sleep(settle);
            }
            let device = match (capture, window, monitor) {
                (Capture::Window, Some(title), _) => Some(format!("window:{title}")),
                (_, _, Some(m)) => Some(m.clone()),
                _ => None,
            };
            let profile = Profile::load("desktop").map_err(|e| e.to_string())?;
            let env = match agent::open_environment(&profile, device.as_deref()) {
                Ok(env) => env,
                Err(e) => {
                    if let Some(mut c) = child {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(e.to_string());
                }
            };
            Ok(Launched {
                env,
                profile_toml: profile_toml("desktop")?,
                child,
                window: window.clone(),
            })
        }
        Target::Android { package, device } => {
            if !package
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(format!(
                    "target.package {package:?} is not an Android package name (letters, digits, dots, underscores)"
                ));
            }
            let mut phone = AndroidDevice::connect(device.as_deref()).map_err(|e| e.to_string())?;
            phone
                .shell(&format!("am force-stop {package}"))
                .map_err(|e| e.to_string())?;
            match phone
                .perform(&Action::OpenApp {
                    name: package.clone(),
                })
                .map_err(|e| e.to_string())?
            {
                Outcome::Done => {}
                Outcome::Failed { reason } | Outcome::Refused { reason } => {
                    return Err(format!("cannot start {package}: {reason}"));
                }
            }
            std::thread::sleep(settle);
            Ok(Launched {
                env: Box::new(phone),
                profile_toml: profile_toml("android")?,
                child: None,
                window: None,
            })
        }
    }
}

impl Launched {
    /// Stops the launched app and waits (briefly) until its window is gone, so the next test
    /// starts on a clean screen.
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if let Some(title) = &self.window {
                let start = Instant::now();
                while window_open(title) && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
