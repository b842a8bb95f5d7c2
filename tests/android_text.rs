//! Typing on Android: `input text` escaping for ASCII (what arrives in the fake app's field is what
//! was asked for, shell metacharacters included), the ADBKeyboard base64 broadcast for everything
//! else (decoded contents compared, IME switched and restored), and a clear failure — with nothing
//! typed — when neither path can type the text.

#[path = "support/fake_adb.rs"]
mod fake_adb;

use fake_adb::{FakeAdb, FakeDevice, LATIN_IME, fast_options};
use vlad::action::Action;
use vlad::environment::android::{ADB_KEYBOARD_IME, AndroidDevice};
use vlad::environment::{Environment, Outcome};

/// A fake phone with the Notes app open, and an environment on it.
fn notes_open(device: FakeDevice) -> (FakeAdb, AndroidDevice) {
    let fake = FakeAdb::start(vec![device]).unwrap();
    let mut env = AndroidDevice::connect_to(fake.server(), None, fast_options()).unwrap();
    assert_eq!(
        env.perform(&Action::OpenApp {
            name: "Notes".into()
        })
        .unwrap(),
        Outcome::Done
    );
    (fake, env)
}

fn type_text(env: &mut AndroidDevice, text: &str) -> Outcome {
    env.perform(&Action::Type { text: text.into() }).unwrap()
}

#[test]
fn ascii_with_shell_metacharacters_arrives_verbatim() {
    let (fake, mut env) = notes_open(FakeDevice::phone("p"));
    let before = env.observe().unwrap().screenshot;
    let text = r#"it's 50% off; "quoted" $HOME `tick` & | < > ( ) * ? [x] # hash \back ~user! %d"#;
    assert_eq!(type_text(&mut env, text), Outcome::Done);
    let device = fake.device("p");
    assert_eq!(device.text, text);
    // One `input text` call: spaces sent as %s, the rest quoted for the shell.
    let typed: Vec<&String> = device
        .commands
        .iter()
        .filter(|c| c.starts_with("input text"))
        .collect();
    assert_eq!(typed.len(), 1, "{typed:?}");
    assert!(
        typed[0].starts_with("input text 'it'\\''s%s50%%soff;%s"),
        "{}",
        typed[0]
    );
    assert!(device.broadcasts.is_empty());
    assert_ne!(
        env.observe().unwrap().screenshot,
        before,
        "typed text shows on the screen"
    );
}

#[test]
fn newlines_and_tabs_are_key_presses() {
    let (fake, mut env) = notes_open(FakeDevice::phone("p"));
    assert_eq!(
        type_text(&mut env, "line one\nline two\tend\r\n"),
        Outcome::Done
    );
    let device = fake.device("p");
    assert_eq!(device.text, "line one\nline two\tend\n");
    assert_eq!(
        device.key_events,
        ["KEYCODE_ENTER", "KEYCODE_TAB", "KEYCODE_ENTER"]
    );
    assert_eq!(device.typed, ["line one", "line two", "end"]);
}

#[test]
fn non_ascii_goes_through_adbkeyboard_and_the_ime_is_restored() {
    let (fake, mut env) = notes_open(FakeDevice::phone("p").with_adb_keyboard());
    let text = "héllo 世界\nzwei Grüße";
    assert_eq!(type_text(&mut env, text), Outcome::Done);
    let device = fake.device("p");
    assert_eq!(device.text, text);
    assert_eq!(device.broadcasts, ["héllo 世界", "zwei Grüße"]);
    // The broadcast carries standard base64 of the UTF-8 text (`printf 'héllo 世界' | base64`).
    assert!(
        device
            .commands
            .iter()
            .any(|c| c.starts_with("am broadcast -a ADB_INPUT_B64 --es msg aMOpbGxvIOS4lueVjA==;")),
        "{:?}",
        device.commands
    );
    assert_eq!(device.key_events, ["KEYCODE_ENTER"]);
    // Switched to ADBKeyboard, then back to the user's keyboard, and ADBKeyboard disabled again
    // as it was before.
    assert_eq!(device.ime_history, [ADB_KEYBOARD_IME, LATIN_IME]);
    assert_eq!(device.ime, LATIN_IME);
    assert_eq!(device.enabled_imes, [LATIN_IME]);
    assert!(device.typed.is_empty(), "no part went through `input text`");
}

#[test]
fn adbkeyboard_already_current_is_used_and_left_alone() {
    let mut phone = FakeDevice::phone("p").with_adb_keyboard();
    phone.enabled_imes.push(ADB_KEYBOARD_IME.into());
    phone.ime = ADB_KEYBOARD_IME.into();
    let (fake, mut env) = notes_open(phone);
    assert_eq!(type_text(&mut env, "naïve"), Outcome::Done);
    let device = fake.device("p");
    assert_eq!(device.text, "naïve");
    assert!(device.ime_history.is_empty(), "{:?}", device.ime_history);
    assert_eq!(device.ime, ADB_KEYBOARD_IME);
}

#[test]
fn a_literal_percent_s_cannot_go_through_input_text() {
    let (fake, mut env) = notes_open(FakeDevice::phone("p").with_adb_keyboard());
    assert_eq!(type_text(&mut env, "printf %s"), Outcome::Done);
    assert_eq!(fake.device("p").text, "printf %s");
    assert_eq!(fake.device("p").broadcasts, ["printf %s"]);
}

#[test]
fn without_adbkeyboard_non_ascii_fails_clearly_and_types_nothing() {
    let (fake, mut env) = notes_open(FakeDevice::phone("p"));
    for text in ["héllo 世界", "plain start, then ü", "100%s"] {
        let outcome = type_text(&mut env, text);
        let Outcome::Failed { reason } = &outcome else {
            panic!("expected Failed, got {outcome:?}")
        };
        assert!(reason.contains(&format!("{text:?}")), "{reason}");
        assert!(
            reason.contains("ADBKeyboard") && reason.contains("not installed"),
            "{reason}"
        );
    }
    let device = fake.device("p");
    assert_eq!(device.text, "");
    assert!(device.typed.is_empty());
    assert_eq!(device.ime, LATIN_IME);
    assert!(device.ime_history.is_empty());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the text (no `\r`, which folds into a newline), what lands in the field is
        /// exactly the text: through `input text` for plain ASCII, through ADBKeyboard otherwise.
        #[test]
        fn any_text_arrives_exactly(text in "[^\r]{0,40}", ascii in "[ -~\n\t]{0,40}") {
            let (fake, mut env) = notes_open(FakeDevice::phone("p").with_adb_keyboard());
            for text in [&ascii, &text] {
                fake.with_device("p", |d| d.text.clear());
                prop_assert_eq!(type_text(&mut env, text), Outcome::Done);
                prop_assert_eq!(&fake.device("p").text, text);
                let device = fake.device("p");
                prop_assert_eq!(device.ime.as_str(), LATIN_IME);
            }
        }
    }
}
