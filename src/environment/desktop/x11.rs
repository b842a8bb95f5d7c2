//! X11 facts xcap does not give exactly: RandR monitor rectangles in physical pixels.

use x11rb::connection::Connection;
use x11rb::protocol::randr::ConnectionExt as _;

use super::{DesktopError, Rect};

/// One RandR 1.5 monitor.
#[derive(Debug, Clone)]
pub(super) struct RandrMonitor {
    /// The RandR outputs it shows (xcap's monitor id is one of them).
    pub outputs: Vec<u32>,
    pub rect: Rect,
}

pub(super) fn connect() -> Result<(x11rb::rust_connection::RustConnection, usize), DesktopError> {
    super::check_display()?;
    x11rb::connect(None).map_err(|e| DesktopError::Display {
        display: std::env::var("DISPLAY").unwrap_or_default(),
        reason: e.to_string(),
    })
}

fn x_err(e: impl std::fmt::Display) -> DesktopError {
    DesktopError::Display {
        display: std::env::var("DISPLAY").unwrap_or_default(),
        reason: e.to_string(),
    }
}

/// The active monitors of the default screen.
pub(super) fn monitors() -> Result<Vec<RandrMonitor>, DesktopError> {
    let (conn, screen) = connect()?;
    let root = conn
        .setup()
        .roots
        .get(screen)
        .map(|s| s.root)
        .ok_or_else(|| x_err(format!("screen {screen} missing")))?;
    let reply = conn
        .randr_get_monitors(root, true)
        .map_err(x_err)?
        .reply()
        .map_err(x_err)?;
    Ok(reply
        .monitors
        .iter()
        .map(|m| RandrMonitor {
            outputs: m.outputs.clone(),
            rect: Rect {
                x: i32::from(m.x),
                y: i32::from(m.y),
                width: u32::from(m.width),
                height: u32::from(m.height),
            },
        })
        .collect())
}
