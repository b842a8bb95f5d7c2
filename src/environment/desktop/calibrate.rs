//! `vlad calibrate`: a self-test of the whole screenshot → click path on X11.
//!
//! It opens its own small window (X11, override-redirect, centred on the monitor), draws five
//! markers of unusual colours, finds them in a real screenshot taken through the environment,
//! clicks each one through the real input path ([`DesktopEnvironment::perform`]), and reads where
//! the clicks landed from the button events the window receives. Landed minus drawn gives the
//! offset; the slope of landed over drawn gives the scale (1.0 and 0 px when all is well).

use std::time::{Duration, Instant};

use serde::Serialize;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    ConfigureWindowAux, ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask, Rectangle,
    StackMode, WindowClass,
};

use super::{DesktopEnvironment, DesktopError, DesktopTarget, Rect, monitors};
use crate::action::Action;
use crate::environment::{Environment, Outcome};

/// Window size and marker layout, in physical pixels of the window.
const WIDTH: u16 = 420;
const HEIGHT: u16 = 300;
const MARKER: u16 = 15;
const MARKERS: [((i32, i32), [u8; 3]); 5] = [
    ((30, 30), [201, 17, 233]),
    ((390, 30), [17, 233, 201]),
    ((30, 270), [233, 201, 17]),
    ((390, 270), [91, 13, 177]),
    ((210, 150), [13, 177, 91]),
];

/// One marker: where it was drawn, seen, clicked and where the click landed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Marker {
    /// Centre in window pixels, as drawn.
    pub drawn: [i32; 2],
    /// Centre found in the screenshot (screenshot pixels).
    pub seen: [f64; 2],
    /// The screenshot pixel clicked.
    pub clicked: [i32; 2],
    /// Where the window got the button press (window pixels); `None` when it got none.
    pub landed: Option<[i32; 2]>,
    /// The pointer in root-window pixels after the click.
    pub pointer: [i32; 2],
    /// Distance between drawn and landed, in pixels.
    pub error: Option<f64>,
}

/// What `vlad calibrate` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    pub identity: String,
    /// The monitor in physical pixels, and the scale factor the system reports for it.
    pub monitor: Rect,
    pub reported_scale_factor: f64,
    /// The calibration window in root-window pixels.
    pub window: Rect,
    pub markers: Vec<Marker>,
    /// Screenshot pixels per window pixel, measured from the markers (1.0: capture is physical).
    pub capture_scale: [f64; 2],
    /// Mean landed − drawn, in pixels (0 when clicks land where aimed).
    pub offset: [f64; 2],
    /// Slope of landed over drawn (1.0 when clicks land where aimed).
    pub scale: [f64; 2],
    pub max_error: f64,
    pub tolerance: f64,
    /// Every marker received its click within `tolerance` pixels.
    pub ok: bool,
}

/// Least-squares slope and intercept of `y` over `x`; `None` with fewer than two distinct `x`.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

/// Mean of `landed - drawn` per axis, and the slope of landed over drawn per axis.
pub fn offset_and_scale(pairs: &[([i32; 2], [i32; 2])]) -> ([f64; 2], [f64; 2]) {
    let mut offset = [f64::NAN; 2];
    let mut scale = [f64::NAN; 2];
    if pairs.is_empty() {
        return (offset, scale);
    }
    for axis in 0..2 {
        let pts: Vec<(f64, f64)> = pairs
            .iter()
            .map(|(d, l)| (f64::from(d[axis]), f64::from(l[axis])))
            .collect();
        offset[axis] = pts.iter().map(|(d, l)| l - d).sum::<f64>() / pts.len() as f64;
        if let Some((slope, _)) = fit(&pts) {
            scale[axis] = slope;
        }
    }
    (offset, scale)
}

fn x_err(e: impl std::fmt::Display) -> DesktopError {
    DesktopError::Calibration(format!("X11: {e}"))
}

/// Centroid of the pixels of exactly `color`, and how many there were.
fn find_color(img: &image::RgbImage, color: [u8; 3]) -> Option<([f64; 2], u32)> {
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0u32);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 == color {
            sx += f64::from(x);
            sy += f64::from(y);
            n += 1;
        }
    }
    (n > 0).then(|| ([sx / f64::from(n), sy / f64::from(n)], n))
}

/// Runs the self-test on a monitor (`DesktopTarget::Primary` or `Monitor`).
pub fn calibrate(target: DesktopTarget, tolerance: f64) -> Result<Calibration, DesktopError> {
    if let DesktopTarget::Window(_) = target {
        return Err(DesktopError::Calibration(
            "calibrate works on a monitor, not a window".into(),
        ));
    }
    let mut env = DesktopEnvironment::open(target.clone())?;
    let identity = env.describe().identity;
    let info = monitors()?
        .into_iter()
        .find(|m| format!("desktop:monitor:{}", m.id) == identity)
        .ok_or_else(|| DesktopError::Calibration("the monitor vanished".into()))?;
    let mon = info.physical;

    let (conn, screen_num) = super::x11::connect()?;
    let screen = conn
        .setup()
        .roots
        .get(screen_num)
        .cloned()
        .ok_or_else(|| x_err("no screen"))?;
    if screen.root_depth != 24 && screen.root_depth != 32 {
        return Err(DesktopError::Calibration(format!(
            "the screen has depth {}; calibrate draws with 24-bit TrueColor pixels",
            screen.root_depth
        )));
    }
    let window = Rect {
        x: mon.x + (mon.width as i32 - i32::from(WIDTH)) / 2,
        y: mon.y + (mon.height as i32 - i32::from(HEIGHT)) / 2,
        width: u32::from(WIDTH),
        height: u32::from(HEIGHT),
    };
    let win = conn.generate_id().map_err(x_err)?;
    conn.create_window(
        screen.root_depth,
        win,
        screen.root,
        window.x as i16,
        window.y as i16,
        WIDTH,
        HEIGHT,
        0,
        WindowClass::INPUT_OUTPUT,
        screen.root_visual,
        &CreateWindowAux::new()
            .background_pixel(0x00ff_ffff)
            .override_redirect(1)
            .event_mask(EventMask::EXPOSURE | EventMask::BUTTON_PRESS),
    )
    .map_err(x_err)?;
    // From here on the window must go away whatever happens.
    let result = run(&mut env, &conn, &screen, win, window);
    let _ = conn.destroy_window(win);
    let _ = conn.flush();
    let (markers, capture_scale) = result?;

    let pairs: Vec<([i32; 2], [i32; 2])> = markers
        .iter()
        .filter_map(|m| m.landed.map(|l| (m.drawn, l)))
        .collect();
    let (offset, scale) = offset_and_scale(&pairs);
    let max_error = markers
        .iter()
        .map(|m| m.error.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    Ok(Calibration {
        identity,
        monitor: mon,
        reported_scale_factor: info.scale_factor,
        window,
        ok: max_error <= tolerance,
        markers,
        capture_scale,
        offset,
        scale,
        max_error,
        tolerance,
    })
}

fn run(
    env: &mut DesktopEnvironment,
    conn: &impl Connection,
    screen: &x11rb::protocol::xproto::Screen,
    win: u32,
    window: Rect,
) -> Result<(Vec<Marker>, [f64; 2]), DesktopError> {
    conn.map_window(win).map_err(x_err)?;
    conn.configure_window(win, &ConfigureWindowAux::new().stack_mode(StackMode::ABOVE))
        .map_err(x_err)?;
    conn.flush().map_err(x_err)?;
    wait_for(
        conn,
        Duration::from_secs(5),
        |e| matches!(e, Event::Expose(x) if x.window == win),
    )?
    .ok_or_else(|| DesktopError::Calibration("the window was never shown (no Expose)".into()))?;

    let gc = conn.generate_id().map_err(x_err)?;
    conn.create_gc(gc, win, &CreateGCAux::new())
        .map_err(x_err)?;
    for ((cx, cy), [r, g, b]) in MARKERS {
        let pixel = (u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b);
        conn.change_gc(
            gc,
            &x11rb::protocol::xproto::ChangeGCAux::new().foreground(pixel),
        )
        .map_err(x_err)?;
        let half = i32::from(MARKER / 2);
        conn.poly_fill_rectangle(
            win,
            gc,
            &[Rectangle {
                x: (cx - half) as i16,
                y: (cy - half) as i16,
                width: MARKER,
                height: MARKER,
            }],
        )
        .map_err(x_err)?;
    }
    // A round trip: everything drawn has reached the server.
    conn.get_input_focus()
        .map_err(x_err)?
        .reply()
        .map_err(x_err)?;
    std::thread::sleep(Duration::from_millis(150));

    let shot = env
        .observe()
        .map_err(|e| DesktopError::Capture(e.to_string()))?;
    let mut seen = Vec::new();
    for (i, ((cx, cy), color)) in MARKERS.iter().enumerate() {
        let (c, _) = find_color(&shot.screenshot, *color).ok_or_else(|| {
            DesktopError::Calibration(format!(
                "marker {} (drawn at window ({cx}, {cy}), window at root ({}, {})) is not in the screenshot: another window on top, or a capture of the wrong area",
                i + 1,
                window.x,
                window.y
            ))
        })?;
        seen.push(c);
    }
    let seen_pts = |axis: usize| -> Vec<(f64, f64)> {
        MARKERS
            .iter()
            .zip(&seen)
            .map(|(((cx, cy), _), s)| (f64::from(if axis == 0 { *cx } else { *cy }), s[axis]))
            .collect()
    };
    let capture_scale = [
        fit(&seen_pts(0)).map_or(f64::NAN, |f| f.0),
        fit(&seen_pts(1)).map_or(f64::NAN, |f| f.0),
    ];

    let mut markers = Vec::new();
    for (((cx, cy), _), s) in MARKERS.iter().zip(&seen) {
        let clicked = [s[0].round() as i32, s[1].round() as i32];
        let outcome = env.perform(&Action::Click {
            x: clicked[0],
            y: clicked[1],
        });
        match outcome {
            Ok(Outcome::Done) => {}
            Ok(other) => {
                return Err(DesktopError::Calibration(format!(
                    "clicking ({}, {}) did not happen: {other:?}",
                    clicked[0], clicked[1]
                )));
            }
            Err(e) => return Err(DesktopError::Calibration(e.to_string())),
        }
        let press = wait_for(
            conn,
            Duration::from_secs(2),
            |e| matches!(e, Event::ButtonPress(b) if b.event == win),
        )?;
        let landed = match press {
            Some(Event::ButtonPress(b)) => Some([i32::from(b.event_x), i32::from(b.event_y)]),
            _ => None,
        };
        let p = conn
            .query_pointer(screen.root)
            .map_err(x_err)?
            .reply()
            .map_err(x_err)?;
        let error = landed.map(|l| f64::from(l[0] - cx).hypot(f64::from(l[1] - cy)));
        markers.push(Marker {
            drawn: [*cx, *cy],
            seen: *s,
            clicked,
            landed,
            pointer: [i32::from(p.root_x), i32::from(p.root_y)],
            error,
        });
    }
    Ok((markers, capture_scale))
}

/// Polls events until `want` matches one or `timeout` passes.
fn wait_for(
    conn: &impl Connection,
    timeout: Duration,
    want: impl Fn(&Event) -> bool,
) -> Result<Option<Event>, DesktopError> {
    let start = Instant::now();
    loop {
        while let Some(e) = conn.poll_for_event().map_err(x_err)? {
            if want(&e) {
                return Ok(Some(e));
            }
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_slope_and_intercept() {
        let pts: Vec<(f64, f64)> = [30.0, 210.0, 390.0]
            .iter()
            .map(|&x| (x, 2.0 * x + 5.0))
            .collect();
        let (a, b) = fit(&pts).unwrap_or((0.0, 0.0));
        assert!((a - 2.0).abs() < 1e-9 && (b - 5.0).abs() < 1e-9, "{a} {b}");
        assert_eq!(fit(&[(1.0, 1.0)]), None);
        assert_eq!(fit(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn a_halved_click_shows_as_scale_one_half() {
        // What a wrong HiDPI division looks like: every click lands at half the distance.
        let pairs: Vec<([i32; 2], [i32; 2])> = MARKERS
            .iter()
            .map(|((x, y), _)| ([*x, *y], [x / 2, y / 2]))
            .collect();
        let (offset, scale) = offset_and_scale(&pairs);
        assert!(
            (scale[0] - 0.5).abs() < 0.01 && (scale[1] - 0.5).abs() < 0.02,
            "{scale:?}"
        );
        assert!(offset[0] < -50.0, "{offset:?}");
    }

    #[test]
    fn a_shifted_click_shows_as_offset() {
        let pairs: Vec<([i32; 2], [i32; 2])> = MARKERS
            .iter()
            .map(|((x, y), _)| ([*x, *y], [x + 7, y - 3]))
            .collect();
        let (offset, scale) = offset_and_scale(&pairs);
        assert_eq!(offset, [7.0, -3.0]);
        assert!((scale[0] - 1.0).abs() < 1e-9 && (scale[1] - 1.0).abs() < 1e-9);
    }
}
