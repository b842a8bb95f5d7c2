//! An in-memory screen for tests and dry runs: it draws rectangles ("widgets") it is given, lets
//! actions change them (a click toggles a button, typed text lands in the focused field), and
//! records every action it receives. No display needed.

use image::{Rgb, RgbImage};

use super::{Description, Environment, EnvironmentError, EnvironmentKind, Observation, Outcome};
use crate::action::Action;

/// A rectangle on the virtual screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Widget {
    pub name: String,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub color: [u8; 3],
    /// Text typed while this widget had focus.
    pub text: String,
    /// How often it was clicked.
    pub clicks: u32,
}

impl Widget {
    pub fn new(
        name: impl Into<String>,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        color: [u8; 3],
    ) -> Self {
        Self {
            name: name.into(),
            x,
            y,
            width,
            height,
            color,
            text: String::new(),
            clicks: 0,
        }
    }

    fn contains(&self, x: i32, y: i32) -> bool {
        x >= self.x as i32
            && y >= self.y as i32
            && x < (self.x + self.width) as i32
            && y < (self.y + self.height) as i32
    }
}

/// The virtual screen.
#[derive(Debug, Clone)]
pub struct VirtualScreen {
    width: u32,
    height: u32,
    background: [u8; 3],
    pub widgets: Vec<Widget>,
    /// Index into `widgets` of the field that receives typed text.
    pub focus: Option<usize>,
    /// Every action performed, in order.
    pub actions: Vec<Action>,
    identity: String,
}

impl VirtualScreen {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            background: [240, 240, 240],
            widgets: Vec::new(),
            focus: None,
            actions: Vec::new(),
            identity: format!("virtual:{width}x{height}"),
        }
    }

    pub fn with_widget(mut self, widget: Widget) -> Self {
        self.widgets.push(widget);
        self
    }

    pub fn widget(&self, name: &str) -> Option<&Widget> {
        self.widgets.iter().find(|w| w.name == name)
    }

    /// The screen as it looks now. A widget's color darkens with each click so that a click is
    /// visible in the next screenshot; focused widgets get a border.
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(self.width, self.height, Rgb(self.background));
        for (i, w) in self.widgets.iter().enumerate() {
            let shade = |c: u8| c.saturating_sub((w.clicks.min(8) * 20) as u8);
            let fill = Rgb([shade(w.color[0]), shade(w.color[1]), shade(w.color[2])]);
            for y in w.y..(w.y + w.height).min(self.height) {
                for x in w.x..(w.x + w.width).min(self.width) {
                    let border =
                        x == w.x || y == w.y || x + 1 == w.x + w.width || y + 1 == w.y + w.height;
                    let focused = self.focus == Some(i);
                    img.put_pixel(
                        x,
                        y,
                        if border && focused {
                            Rgb([0, 0, 255])
                        } else {
                            fill
                        },
                    );
                }
            }
            // Typed text shows as one dark pixel column per character, so text changes the image.
            for (k, _) in w.text.chars().enumerate() {
                let x = w.x + 2 + 2 * k as u32;
                if x + 1 < w.x + w.width && w.height > 4 {
                    for y in w.y + 2..w.y + w.height - 2 {
                        img.put_pixel(x, y, Rgb([20, 20, 20]));
                    }
                }
            }
        }
        img
    }

    fn in_bounds(&self, x: i32, y: i32) -> bool {
        x >= 0 && y >= 0 && (x as u32) < self.width && (y as u32) < self.height
    }

    fn click(&mut self, x: i32, y: i32) {
        if let Some(i) = self.widgets.iter().rposition(|w| w.contains(x, y)) {
            self.widgets[i].clicks += 1;
            self.focus = Some(i);
        } else {
            self.focus = None;
        }
    }
}

impl Environment for VirtualScreen {
    fn observe(&mut self) -> Result<Observation, EnvironmentError> {
        Ok(Observation {
            screenshot: self.render(),
            scale_factor: 1.0,
            origin: (0, 0),
            identity: self.identity.clone(),
        })
    }

    fn perform(&mut self, action: &Action) -> Result<Outcome, EnvironmentError> {
        self.actions.push(action.clone());
        let outside = |x: i32, y: i32| Outcome::Failed {
            reason: format!(
                "({x}, {y}) is outside the {}x{} screen",
                self.width, self.height
            ),
        };
        let outcome = match action {
            Action::Click { x, y }
            | Action::DoubleClick { x, y }
            | Action::RightClick { x, y }
            | Action::LongPress { x, y, .. } => {
                if !self.in_bounds(*x, *y) {
                    return Ok(outside(*x, *y));
                }
                self.click(*x, *y);
                Outcome::Done
            }
            Action::Drag {
                x, y, to_x, to_y, ..
            }
            | Action::Swipe {
                x, y, to_x, to_y, ..
            } => {
                if !self.in_bounds(*x, *y) {
                    return Ok(outside(*x, *y));
                }
                if !self.in_bounds(*to_x, *to_y) {
                    return Ok(outside(*to_x, *to_y));
                }
                Outcome::Done
            }
            Action::Scroll { x, y, .. } => {
                if !self.in_bounds(*x, *y) {
                    return Ok(outside(*x, *y));
                }
                Outcome::Done
            }
            Action::Type { text } => match self.focus {
                Some(i) => {
                    self.widgets[i].text.push_str(text);
                    Outcome::Done
                }
                None => Outcome::Failed {
                    reason: "no field has focus; click one first".into(),
                },
            },
            Action::Key { .. }
            | Action::Enter
            | Action::Home
            | Action::Back
            | Action::AppSwitch => Outcome::Done,
            Action::Wait { .. } => Outcome::Done,
            Action::OpenApp { name } => Outcome::Refused {
                reason: format!("the virtual screen has no apps (asked for {name:?})"),
            },
            Action::Finish { .. } | Action::CallUser { .. } | Action::Tool { .. } => {
                Outcome::Refused {
                    reason: format!("{} is handled by the agent, not the screen", action.tag()),
                }
            }
        };
        Ok(outcome)
    }

    fn describe(&self) -> Description {
        Description {
            kind: EnvironmentKind::Virtual,
            identity: self.identity.clone(),
            width: self.width,
            height: self.height,
            scale_factor: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> VirtualScreen {
        VirtualScreen::new(200, 100)
            .with_widget(Widget::new("field", 10, 10, 100, 20, [255, 255, 255]))
            .with_widget(Widget::new("ok", 150, 60, 40, 30, [0, 200, 0]))
    }

    #[test]
    fn click_focuses_and_changes_the_screen() {
        let mut s = screen();
        let before = s.observe().unwrap().screenshot;
        assert_eq!(
            s.perform(&Action::Click { x: 160, y: 70 }).unwrap(),
            Outcome::Done
        );
        assert_eq!(s.widget("ok").unwrap().clicks, 1);
        assert_ne!(before, s.observe().unwrap().screenshot);
    }

    #[test]
    fn typing_goes_to_the_focused_field() {
        let mut s = screen();
        let typed = Action::Type {
            text: "héllo".into(),
        };
        assert!(matches!(s.perform(&typed).unwrap(), Outcome::Failed { .. }));
        s.perform(&Action::Click { x: 20, y: 15 }).unwrap();
        assert_eq!(s.perform(&typed).unwrap(), Outcome::Done);
        assert_eq!(s.widget("field").unwrap().text, "héllo");
        assert_eq!(s.actions.len(), 3);
    }

    #[test]
    fn points_outside_the_screen_fail() {
        let mut s = screen();
        assert!(matches!(
            s.perform(&Action::Click { x: 200, y: 5 }).unwrap(),
            Outcome::Failed { .. }
        ));
    }
}
