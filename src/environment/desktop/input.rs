//! Mouse and keyboard through enigo, with every press released even when a step fails.
//!
//! Points here are already input coordinates (see [`super::mapping`]).

use std::time::{Duration, Instant};

use enigo::{Axis, Button, Coordinate, Direction, Enigo, Key, Keyboard, Mouse, Settings};

use super::keys::{KeyError, ResolvedKey};
use crate::action::ScrollDirection;

/// An input call that failed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(
        "cannot open the input connection: {0} (on X11 the XTEST extension is needed; is DISPLAY right?)"
    )]
    Connect(String),
    #[error("input failed while {what}: {reason}")]
    Simulate { what: String, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn sim(what: impl Into<String>) -> impl FnOnce(enigo::InputError) -> InputError {
    let what = what.into();
    move |e| InputError::Simulate {
        what,
        reason: e.to_string(),
    }
}

/// Pause after moving the pointer so that the window under it sees the motion (enter/leave,
/// hover) before the button, as it would from a real mouse.
const SETTLE: Duration = Duration::from_millis(30);

/// Keys and buttons held down, released in reverse order when dropped — on success and on every
/// error path alike.
struct Held<'a, E: Keyboard + Mouse> {
    enigo: &'a mut E,
    keys: Vec<Key>,
    buttons: Vec<Button>,
}

impl<'a, E: Keyboard + Mouse> Held<'a, E> {
    fn new(enigo: &'a mut E) -> Self {
        Self {
            enigo,
            keys: Vec::new(),
            buttons: Vec::new(),
        }
    }

    fn press_key(&mut self, key: Key) -> Result<(), InputError> {
        self.enigo
            .key(key, Direction::Press)
            .map_err(sim(format!("pressing {key:?}")))?;
        self.keys.push(key);
        Ok(())
    }

    fn press_button(&mut self, button: Button) -> Result<(), InputError> {
        self.enigo
            .button(button, Direction::Press)
            .map_err(sim(format!("pressing the {button:?} button")))?;
        self.buttons.push(button);
        Ok(())
    }

    fn move_to(&mut self, (x, y): (i32, i32)) -> Result<(), InputError> {
        self.enigo
            .move_mouse(x, y, Coordinate::Abs)
            .map_err(sim(format!("moving the pointer to ({x}, {y})")))
    }

    /// Releases everything, reporting the first failure (and still trying the rest).
    fn release_all(mut self) -> Result<(), InputError> {
        let mut first = None;
        while let Some(b) = self.buttons.pop() {
            if let Err(e) = self.enigo.button(b, Direction::Release) {
                first.get_or_insert_with(|| sim(format!("releasing the {b:?} button"))(e));
            }
        }
        while let Some(k) = self.keys.pop() {
            if let Err(e) = self.enigo.key(k, Direction::Release) {
                first.get_or_insert_with(|| sim(format!("releasing {k:?}"))(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl<E: Keyboard + Mouse> Drop for Held<'_, E> {
    fn drop(&mut self) {
        while let Some(b) = self.buttons.pop() {
            if let Err(e) = self.enigo.button(b, Direction::Release) {
                tracing::error!("could not release the {b:?} button: {e}");
            }
        }
        while let Some(k) = self.keys.pop() {
            if let Err(e) = self.enigo.key(k, Direction::Release) {
                tracing::error!("could not release {k:?}: {e}");
            }
        }
    }
}

/// How long the keyboard mapping stays as it is after text outside the keyboard's layout was
/// typed (see [`Input`]'s `Drop`).
const MAPPED_KEYS_LINGER: Duration = Duration::from_millis(300);

/// How long no key event is sent before keycodes are remapped for text (see `flush_text`).
const QUIET_BEFORE_REMAPPING: Duration = Duration::from_millis(100);

/// At most this many characters get keycodes mapped for one stretch of text (see `flush_text`).
/// Below the spare keycodes of common keymaps (Xvfb's has 19), so mapping one stretch does not
/// make enigo unmap the keycodes of the same stretch.
const MAPPED_PER_STRETCH: usize = 8;

/// The input connection (enigo; any `Keyboard + Mouse` in the unit tests).
pub(super) struct Input<E = Enigo> {
    enigo: E,
    /// When text with characters beyond ASCII was last typed: X11 types those through keycodes
    /// that enigo maps for the purpose and unmaps when the connection closes.
    typed_unmapped: Option<Instant>,
    /// When the last key event was sent.
    last_key: Option<Instant>,
}

/// Whether typing `c` may need a keycode mapped for it. enigo on X11 maps one for every keysym
/// that is not on the first level of some key: all but lowercase ASCII letters, digits and space
/// on common layouts (a wrong guess only changes how text is split, never what is typed).
fn may_need_a_mapping(c: char) -> bool {
    !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == ' ')
}

impl Input<Enigo> {
    pub(super) fn new() -> Result<Self, InputError> {
        let enigo =
            Enigo::new(&Settings::default()).map_err(|e| InputError::Connect(e.to_string()))?;
        Ok(Self {
            enigo,
            typed_unmapped: None,
            last_key: None,
        })
    }
}

impl<E> Drop for Input<E> {
    /// An app looks a key event's keycode up in the keyboard mapping when it handles the event,
    /// not when it was sent: closing the connection right after typing (`vlad do` exits) would
    /// unmap the last characters' keycodes before a busy app has read them, and they would be
    /// lost. So the mapping lingers briefly.
    fn drop(&mut self) {
        if let Some(typed) = self.typed_unmapped {
            std::thread::sleep(MAPPED_KEYS_LINGER.saturating_sub(typed.elapsed()));
        }
    }
}

impl<E: Keyboard + Mouse> Input<E> {
    fn move_to(&mut self, (x, y): (i32, i32)) -> Result<(), InputError> {
        self.enigo
            .move_mouse(x, y, Coordinate::Abs)
            .map_err(sim(format!("moving the pointer to ({x}, {y})")))?;
        std::thread::sleep(SETTLE);
        Ok(())
    }

    pub(super) fn click(
        &mut self,
        at: (i32, i32),
        button: Button,
        count: u32,
    ) -> Result<(), InputError> {
        self.move_to(at)?;
        for _ in 0..count {
            let mut held = Held::new(&mut self.enigo);
            held.press_button(button)?;
            held.release_all()?;
        }
        Ok(())
    }

    pub(super) fn long_press(&mut self, at: (i32, i32), hold: Duration) -> Result<(), InputError> {
        self.move_to(at)?;
        let mut held = Held::new(&mut self.enigo);
        held.press_button(Button::Left)?;
        std::thread::sleep(hold);
        held.release_all()
    }

    /// Press at `from`, move in steps to `to` over `duration`, release.
    pub(super) fn drag(
        &mut self,
        from: (i32, i32),
        to: (i32, i32),
        duration: Duration,
    ) -> Result<(), InputError> {
        self.move_to(from)?;
        let mut held = Held::new(&mut self.enigo);
        held.press_button(Button::Left)?;
        std::thread::sleep(SETTLE);
        let (dx, dy) = (f64::from(to.0 - from.0), f64::from(to.1 - from.1));
        let steps = ((dx.hypot(dy) / 8.0).ceil() as u32).clamp(8, 60);
        let pause = duration / steps;
        for i in 1..=steps {
            let t = f64::from(i) / f64::from(steps);
            let p = (
                from.0 + (dx * t).round() as i32,
                from.1 + (dy * t).round() as i32,
            );
            held.move_to(p)?;
            std::thread::sleep(pause);
        }
        held.move_to(to)?;
        std::thread::sleep(SETTLE);
        held.release_all()
    }

    /// `amount` wheel notches with the pointer at `at`.
    pub(super) fn scroll(
        &mut self,
        at: (i32, i32),
        direction: ScrollDirection,
        amount: u32,
    ) -> Result<(), InputError> {
        self.move_to(at)?;
        let n = i32::try_from(amount.min(1000)).unwrap_or(1000);
        let (length, axis) = match direction {
            ScrollDirection::Down => (n, Axis::Vertical),
            ScrollDirection::Up => (-n, Axis::Vertical),
            ScrollDirection::Right => (n, Axis::Horizontal),
            ScrollDirection::Left => (-n, Axis::Horizontal),
        };
        self.enigo
            .scroll(length, axis)
            .map_err(sim(format!("scrolling {} by {amount}", direction.as_str())))
    }

    /// Types `text` as Unicode; `\n` presses Enter and `\t` presses Tab (`\r` is dropped).
    pub(super) fn type_text(&mut self, text: &str) -> Result<(), InputError> {
        let mut run = String::new();
        for c in text.chars() {
            let special = match c {
                '\n' => Some(Key::Return),
                '\t' => Some(Key::Tab),
                '\r' => {
                    continue;
                }
                _ => None,
            };
            match special {
                Some(key) => {
                    self.flush_text(&mut run)?;
                    self.tap(key)?;
                }
                None => run.push(c),
            }
        }
        self.flush_text(&mut run)
    }

    /// Types `run` in stretches of at most [`MAPPED_PER_STRETCH`] characters that may need a
    /// keycode mapped (see [`may_need_a_mapping`]). Before typing a stretch, its keycodes are
    /// mapped all at once, after [`QUIET_BEFORE_REMAPPING`] without key events.
    ///
    /// Why: an X11 app reads the keyboard mapping lazily. Xlib loads it when the app handles
    /// its first key event, and only then asks to hear of changes, so a remap that lands
    /// between the two is never seen and its character is lost (CI runs typed 'hllo 世界' for
    /// 'héllo 世界': the keycode for 'é' was mapped just as the app handled 'h'). An app also
    /// looks a keycode up when it handles the event, not when it was sent, so a keycode must not
    /// be remapped while a slow app still has events for it queued. Mapping a stretch's keycodes
    /// before its first key, after a quiet moment, keeps both races away from typing.
    fn flush_text(&mut self, run: &mut String) -> Result<(), InputError> {
        let chars: Vec<char> = run.chars().collect();
        let mut start = 0;
        while start < chars.len() {
            let mut mapped: Vec<char> = Vec::new();
            let mut end = start;
            while let Some(&c) = chars.get(end) {
                if may_need_a_mapping(c) && !mapped.contains(&c) {
                    if mapped.len() == MAPPED_PER_STRETCH {
                        break;
                    }
                    mapped.push(c);
                }
                end += 1;
            }
            // keycodes are mapped for text on X11 only (elsewhere enigo types Unicode directly)
            if cfg!(target_os = "linux") && !mapped.is_empty() {
                self.map_keycodes(&mapped)?;
            }
            self.send_text(&mut chars[start..end].iter().collect())?;
            start = end;
        }
        run.clear();
        Ok(())
    }

    /// Has enigo map a keycode for each character that needs one, without typing it: enigo maps
    /// the keysym before sending an event, and only a release is sent, which the X server drops
    /// because the key is not down. The mapping then stays until enigo needs the keycode for
    /// another character or the connection closes.
    fn map_keycodes(&mut self, chars: &[char]) -> Result<(), InputError> {
        if let Some(last) = self.last_key {
            std::thread::sleep(QUIET_BEFORE_REMAPPING.saturating_sub(last.elapsed()));
        }
        for &c in chars {
            self.enigo
                .key(Key::Unicode(c), Direction::Release)
                .map_err(sim(format!("mapping a keycode for {c:?}")))?;
        }
        self.typed_unmapped = Some(Instant::now());
        Ok(())
    }

    fn send_text(&mut self, text: &mut String) -> Result<(), InputError> {
        if !text.is_empty() {
            self.last_key = Some(Instant::now());
            self.enigo
                .text(text)
                .map_err(sim(format!("typing {text:?}")))?;
            text.clear();
        }
        Ok(())
    }

    fn tap(&mut self, key: Key) -> Result<(), InputError> {
        self.last_key = Some(Instant::now());
        let mut held = Held::new(&mut self.enigo);
        held.press_key(key)?;
        held.release_all()
    }

    /// Presses the keys in order (modifiers first, as given) and releases them in reverse.
    pub(super) fn combo(&mut self, keys: &[ResolvedKey]) -> Result<(), InputError> {
        self.last_key = Some(Instant::now());
        let mut held = Held::new(&mut self.enigo);
        for k in keys {
            held.press_key(k.key)?;
        }
        held.release_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::environment::desktop::keys::resolve_combo;
    use enigo::InputResult;

    /// Records every call; fails the call numbered `fail_at` (counting from 0).
    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        fail_at: Option<usize>,
    }

    impl Fake {
        fn record(&mut self, what: String) -> InputResult<()> {
            let n = self.log.len();
            self.log.push(what);
            if self.fail_at == Some(n) {
                return Err(enigo::InputError::Simulate("injected failure"));
            }
            Ok(())
        }
    }

    impl Keyboard for Fake {
        fn fast_text(&mut self, _text: &str) -> InputResult<Option<()>> {
            Ok(None)
        }
        fn key(&mut self, key: Key, direction: Direction) -> InputResult<()> {
            self.record(format!("{direction:?} {key:?}"))
        }
        fn raw(&mut self, keycode: u16, direction: Direction) -> InputResult<()> {
            self.record(format!("{direction:?} raw {keycode}"))
        }
    }

    impl Mouse for Fake {
        fn button(&mut self, button: Button, direction: Direction) -> InputResult<()> {
            self.record(format!("{direction:?} {button:?}"))
        }
        fn move_mouse(&mut self, x: i32, y: i32, _c: Coordinate) -> InputResult<()> {
            self.record(format!("move {x},{y}"))
        }
        fn scroll(&mut self, length: i32, axis: Axis) -> InputResult<()> {
            self.record(format!("scroll {length} {axis:?}"))
        }
        fn main_display(&self) -> InputResult<(i32, i32)> {
            Ok((100, 100))
        }
        fn location(&self) -> InputResult<(i32, i32)> {
            Ok((0, 0))
        }
    }

    fn input(fail_at: Option<usize>) -> Input<Fake> {
        Input {
            enigo: Fake {
                log: Vec::new(),
                fail_at,
            },
            typed_unmapped: None,
            last_key: None,
        }
    }

    /// The log without the pointer and with each key call shortened: `map x` for a release
    /// alone (a keycode mapped, nothing typed), `type x` for a click.
    #[cfg(target_os = "linux")]
    fn key_log(i: &Input<Fake>) -> Vec<String> {
        i.enigo
            .log
            .iter()
            .map(|l| {
                let l = l.replace("Release Unicode('", "map ");
                let l = l.replace("Click Unicode('", "type ");
                l.trim_end_matches("')").to_string()
            })
            .collect()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn text_beyond_ascii_keeps_the_key_mapping_a_moment_before_the_connection_closes() {
        let mut i = input(None);
        i.type_text("hello\n").unwrap();
        assert!(i.typed_unmapped.is_none());
        assert!(!key_log(&i).iter().any(|l| l.starts_with("map")));
        let start = Instant::now();
        drop(i);
        assert!(start.elapsed() < Duration::from_millis(100));

        let mut i = input(None);
        i.type_text("héllo 世界").unwrap();
        // Every keycode the text needs is mapped before its first key.
        let log = key_log(&i);
        assert_eq!(log[..3], ["map é", "map 世", "map 界"]);
        let typed: String = log.iter().filter_map(|l| l.strip_prefix("type ")).collect();
        assert_eq!(typed, "héllo 世界");
        assert_eq!(log.len(), 3 + 8);
        assert!(i.typed_unmapped.is_some());
        let start = Instant::now();
        drop(i);
        assert!(start.elapsed() >= MAPPED_KEYS_LINGER - Duration::from_millis(50));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn keycodes_are_mapped_per_stretch_after_a_quiet_moment() {
        let mut i = input(None);
        i.tap(Key::Return).unwrap();
        let start = Instant::now();
        // Ten characters that need keycodes: two stretches, each mapped before it is typed.
        i.type_text("aABCDEFGHIJb").unwrap();
        assert!(start.elapsed() >= 2 * QUIET_BEFORE_REMAPPING - Duration::from_millis(5));
        let log = key_log(&i);
        assert_eq!(log[..2], ["Press Return", "Release Return"]);
        let rest: Vec<&str> = log[2..].iter().map(String::as_str).collect();
        let mut want: Vec<String> = "ABCDEFGH".chars().map(|c| format!("map {c}")).collect();
        want.push("type a".into());
        want.extend("ABCDEFGH".chars().map(|c| format!("type {c}")));
        want.extend("IJ".chars().map(|c| format!("map {c}")));
        want.extend("IJb".chars().map(|c| format!("type {c}")));
        assert_eq!(rest, want);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_first_text_is_mapped_at_once_and_text_right_after_keys_waits() {
        let mut i = input(None);
        let start = Instant::now();
        i.type_text("Hé").unwrap();
        assert!(start.elapsed() < QUIET_BEFORE_REMAPPING);
        let start = Instant::now();
        i.type_text("É").unwrap();
        assert!(start.elapsed() >= QUIET_BEFORE_REMAPPING - Duration::from_millis(5));
        assert_eq!(
            key_log(&i),
            ["map H", "map é", "type H", "type é", "map É", "type É"]
        );
    }

    #[test]
    fn a_combo_presses_in_order_and_releases_in_reverse() {
        let mut i = input(None);
        let combo = resolve_combo(&["ctrl+shift+t"]).unwrap_or_default();
        assert!(i.combo(&combo).is_ok());
        assert_eq!(
            i.enigo.log,
            [
                "Press Control",
                "Press Shift",
                "Press Unicode('t')",
                "Release Unicode('t')",
                "Release Shift",
                "Release Control"
            ]
        );
    }

    #[test]
    fn a_failed_press_still_releases_the_modifiers_already_down() {
        let mut i = input(Some(2)); // the press of `t` fails
        let combo = resolve_combo(&["ctrl+shift+t"]).unwrap_or_default();
        assert!(matches!(i.combo(&combo), Err(InputError::Simulate { .. })));
        assert_eq!(
            i.enigo.log,
            [
                "Press Control",
                "Press Shift",
                "Press Unicode('t')",
                "Release Shift",
                "Release Control"
            ]
        );
    }

    #[test]
    fn a_drag_that_fails_mid_way_releases_the_button() {
        let mut i = input(Some(4)); // move, press, then the second intermediate move fails
        let r = i.drag((0, 0), (100, 0), Duration::from_millis(0));
        assert!(r.is_err());
        assert_eq!(i.enigo.log.last().map(String::as_str), Some("Release Left"));
        assert_eq!(i.enigo.log[1], "Press Left");
    }

    #[test]
    fn a_drag_moves_in_steps_and_ends_on_the_target() {
        let mut i = input(None);
        assert!(
            i.drag((10, 10), (110, 60), Duration::from_millis(0))
                .is_ok()
        );
        let log = &i.enigo.log;
        assert_eq!(log[0], "move 10,10");
        assert_eq!(log[1], "Press Left");
        let moves = log.iter().filter(|l| l.starts_with("move")).count();
        assert!(moves >= 9, "{log:?}");
        assert_eq!(&log[log.len() - 2..], ["move 110,60", "Release Left"]);
    }

    #[test]
    fn scroll_directions_map_to_signed_wheel_lengths() {
        let mut i = input(None);
        for d in [
            ScrollDirection::Down,
            ScrollDirection::Up,
            ScrollDirection::Right,
            ScrollDirection::Left,
        ] {
            assert!(i.scroll((5, 5), d, 3).is_ok());
        }
        let scrolls: Vec<&String> = i
            .enigo
            .log
            .iter()
            .filter(|l| l.starts_with("scroll"))
            .collect();
        assert_eq!(
            scrolls,
            [
                "scroll 3 Vertical",
                "scroll -3 Vertical",
                "scroll 3 Horizontal",
                "scroll -3 Horizontal"
            ]
        );
    }

    #[test]
    fn newlines_and_tabs_in_text_are_keys() {
        let mut i = input(None);
        assert!(i.type_text("a\tb\r\n").is_ok());
        assert_eq!(
            i.enigo.log,
            [
                "Click Unicode('a')",
                "Press Tab",
                "Release Tab",
                "Click Unicode('b')",
                "Press Return",
                "Release Return"
            ]
        );
    }
}
