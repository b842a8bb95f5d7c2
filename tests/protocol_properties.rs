//! Properties of the protocol: what vlad renders in the model's format parses back to the same
//! action, and coordinate mapping is exact, monotone and stays on the screen.

use proptest::prelude::*;
use serde_json::Value;
use vlad::action::{Action, ScrollDirection};
use vlad::protocol::qwen2vl::render_call;
use vlad::protocol::{ActionSpace, CoordMap, CoordSpace, MarkerStyle, ModelFamily, Protocol, Size};

const TOOLS: [&str; 2] = ["web_search", "calc"];

/// Text a model could emit inside a string: anything but the end-of-turn tokens, which end a
/// reply wherever they appear (the decoder stops there).
fn text() -> impl Strategy<Value = String> {
    "(?s).{0,40}".prop_filter("end-of-turn token", |s| {
        !s.contains("<|im_end|>") && !s.contains("<|endoftext|>")
    })
}

fn coord() -> impl Strategy<Value = f64> {
    (0u32..=1000).prop_map(f64::from)
}

fn point() -> impl Strategy<Value = (f64, f64)> {
    (coord(), coord())
}

fn keys() -> impl Strategy<Value = Vec<String>> {
    let names = [
        "ctrl", "shift", "alt", "meta", "s", "S", "a", "1", "+", "enter", "f5", "pagedown", "tab",
        "é",
    ];
    prop::collection::vec(prop::sample::select(names.to_vec()), 1..4)
        .prop_map(|keys| keys.into_iter().map(str::to_string).collect())
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        text().prop_map(Value::String),
    ]
}

fn tool_args() -> impl Strategy<Value = Value> {
    let value = json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(Value::Array)
    });
    prop::collection::btree_map("[a-z_]{1,8}", value, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn direction() -> impl Strategy<Value = ScrollDirection> {
    prop::sample::select(vec![
        ScrollDirection::Up,
        ScrollDirection::Down,
        ScrollDirection::Left,
        ScrollDirection::Right,
    ])
}

fn action() -> impl Strategy<Value = Action<f64>> {
    prop_oneof![
        point().prop_map(|(x, y)| Action::Click { x, y }),
        point().prop_map(|(x, y)| Action::DoubleClick { x, y }),
        point().prop_map(|(x, y)| Action::RightClick { x, y }),
        (point(), 0u64..=60_000).prop_map(|((x, y), ms)| Action::LongPress { x, y, ms }),
        (point(), point(), prop::option::of(0u64..=60_000)).prop_map(
            |((x, y), (to_x, to_y), ms)| {
                Action::Drag {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            }
        ),
        (point(), point(), prop::option::of(0u64..=60_000)).prop_map(
            |((x, y), (to_x, to_y), ms)| {
                Action::Swipe {
                    x,
                    y,
                    to_x,
                    to_y,
                    ms,
                }
            }
        ),
        (point(), direction(), 1u32..=1000).prop_map(|((x, y), direction, amount)| {
            Action::Scroll {
                x,
                y,
                direction,
                amount,
            }
        }),
        text().prop_map(|text| Action::Type { text }),
        keys().prop_map(|keys| Action::Key { keys }),
        (0u32..=3_600_000).prop_map(|ms| Action::Wait {
            seconds: f64::from(ms) / 1000.0
        }),
        Just(Action::Home),
        Just(Action::Back),
        Just(Action::Enter),
        Just(Action::AppSwitch),
        text().prop_map(|name| Action::OpenApp { name }),
        text().prop_map(|answer| Action::Finish { answer }),
        text().prop_map(|question| Action::CallUser { question }),
        (prop::sample::select(TOOLS.to_vec()), tool_args()).prop_map(|(name, args)| Action::Tool {
            name: name.to_string(),
            args
        }),
    ]
}

fn space() -> impl Strategy<Value = ActionSpace> {
    prop_oneof![Just(ActionSpace::desktop()), Just(ActionSpace::android())]
}

fn style() -> impl Strategy<Value = MarkerStyle> {
    prop_oneof![Just(MarkerStyle::Asterisk), Just(MarkerStyle::Flower)]
}

/// A thought that is plain prose (no markers, no tokens).
fn thought() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 ,.!?这是中文]{0,60}".prop_map(|s| s.trim().to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_rendered_call_parses_back_to_itself(action in action(), space in space(), style in style()) {
        let text = render_call(&action, &space, style);
        let reply = Protocol::new(ModelFamily::Qwen2Vl).with_tools(TOOLS).parse(&text);
        prop_assert_eq!(&reply.errors, &vec![], "{}", text);
        prop_assert_eq!(reply.actions().cloned().collect::<Vec<_>>(), vec![action], "{}", text);
        prop_assert_eq!(reply.markers, style);
        prop_assert!(reply.answer.is_none());
    }

    #[test]
    fn a_rendered_turn_of_several_calls_parses_back(
        thought in thought(),
        actions in prop::collection::vec(action(), 1..5),
        space in space(),
        style in style(),
    ) {
        let calls: Vec<String> = actions.iter().map(|a| render_call(a, &space, style)).collect();
        let text = format!("{thought}\n{}\n", calls.join("\n"));
        let reply = Protocol::new(ModelFamily::Qwen2Vl).with_tools(TOOLS).parse(&text);
        prop_assert_eq!(&reply.errors, &vec![], "{}", text);
        prop_assert_eq!(reply.actions().cloned().collect::<Vec<_>>(), actions);
        let expected_thought = (!thought.is_empty()).then_some(thought);
        prop_assert_eq!(reply.thought, expected_thought);
    }

    #[test]
    fn relative_mapping_is_the_exact_rounded_scaling(x in 0u32..=1000, y in 0u32..=1000, w in 1u32..=10_000, h in 1u32..=10_000) {
        let map = CoordMap::onto_screen(CoordSpace::Relative1000, Size::new(w, h)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = map.map_point(f64::from(x), f64::from(y)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, (oracle(x, w, 1000), oracle(y, h, 1000)));
    }

    #[test]
    fn absolute_mapping_is_the_exact_rounded_scaling(
        (iw, x) in (1u32..=4000).prop_flat_map(|iw| (Just(iw), 0..=iw)),
        (ih, y) in (1u32..=4000).prop_flat_map(|ih| (Just(ih), 0..=ih)),
        w in 1u32..=10_000,
        h in 1u32..=10_000,
    ) {
        let space = CoordSpace::ImagePixels(Size::new(iw, ih));
        let map = CoordMap::onto_screen(space, Size::new(w, h)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = map.map_point(f64::from(x), f64::from(y)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, (oracle(x, w, iw), oracle(y, h, ih)));
    }

    #[test]
    fn mapping_is_monotone_and_stays_on_the_screen(
        a in 0.0f64..=1000.0,
        b in 0.0f64..=1000.0,
        w in 1u32..=8000,
        h in 1u32..=8000,
        scale in 0.25f64..=4.0,
        ox in -5000i32..=5000,
        oy in -5000i32..=5000,
    ) {
        let map = match CoordMap::new(CoordSpace::Relative1000, Size::new(w, h), scale, (ox, oy)) {
            Ok(map) => map,
            // A screen that scales to less than one pixel is refused, not mapped.
            Err(_) => { prop_assert!(f64::from(w.min(h)) * scale < 0.5); return Ok(()); }
        };
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let (x1, y1) = map.map_point(lo, lo).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (x2, y2) = map.map_point(hi, hi).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(x1 <= x2 && y1 <= y2);
        let tw = (f64::from(w) * scale).round_ties_even() as i32;
        let th = (f64::from(h) * scale).round_ties_even() as i32;
        for (x, y) in [(x1, y1), (x2, y2)] {
            prop_assert!(ox <= x && x < ox + tw, "x {} not in {}..{}", x, ox, ox + tw);
            prop_assert!(oy <= y && y < oy + th, "y {} not in {}..{}", y, oy, oy + th);
        }
    }

    #[test]
    fn out_of_range_is_an_error_never_a_clamp(v in prop_oneof![-1e6f64..-1e-9, 1_000.000_001_f64..1e6], w in 1u32..=4000) {
        let map = CoordMap::onto_screen(CoordSpace::Relative1000, Size::new(w, w)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(map.map_point(v, 0.0).is_err());
        prop_assert!(map.map_point(0.0, v).is_err());
    }
}

/// Independent integer arithmetic: round(v * size / max) half to even, then the last pixel
/// for the far edge.
fn oracle(v: u32, size: u32, max: u32) -> i32 {
    let n = u64::from(v) * u64::from(size);
    let (q, r) = (n / u64::from(max), n % u64::from(max));
    let rounded = match (2 * r).cmp(&u64::from(max)) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q % 2),
    };
    rounded.min(u64::from(size) - 1) as i32
}

#[test]
fn other_families_parse_what_they_write() {
    // Not rendered by vlad (it writes the Qwen2-VL format), so a fixed check per family.
    let uitars = Protocol::new(ModelFamily::UiTars).parse("Action: click(start_box='(1,2)')");
    assert_eq!(
        uitars.actions().cloned().collect::<Vec<_>>(),
        vec![Action::Click { x: 1.0, y: 2.0 }]
    );
    let qwen25 = Protocol::new(ModelFamily::Qwen25Vl)
        .parse("<tool_call>{\"name\": \"computer_use\", \"arguments\": {\"action\": \"left_click\", \"coordinate\": [1, 2]}}</tool_call>");
    assert_eq!(
        qwen25.actions().cloned().collect::<Vec<_>>(),
        vec![Action::Click { x: 1.0, y: 2.0 }]
    );
}
