//! Which package an app name means.
//!
//! The shell cannot read app labels: they live in each APK's string resources, and neither
//! `pm list packages` nor `cmd package` prints them (only `aapt`, which phones do not ship). So a
//! name resolves, in this order, as: an installed package name; a stock app from a table of the
//! AOSP/Google package names of well-known labels ("Settings", "Chrome", …); a package whose last
//! (or, failing that, any non-first) dot-separated segment equals the name, ignoring case, spaces
//! and punctuation ("Notes" → `com.example.notes`). Anything else, or several matches, is an error
//! that asks for the package name.

/// Labels of stock apps and the packages that carry them, most common first.
const KNOWN: &[(&str, &[&str])] = &[
    ("settings", &["com.android.settings"]),
    ("chrome", &["com.android.chrome"]),
    ("googlechrome", &["com.android.chrome"]),
    ("browser", &["com.android.browser", "com.android.chrome"]),
    (
        "camera",
        &[
            "com.google.android.GoogleCamera",
            "com.android.camera2",
            "com.android.camera",
        ],
    ),
    (
        "contacts",
        &["com.google.android.contacts", "com.android.contacts"],
    ),
    (
        "phone",
        &["com.google.android.dialer", "com.android.dialer"],
    ),
    (
        "dialer",
        &["com.google.android.dialer", "com.android.dialer"],
    ),
    (
        "messages",
        &[
            "com.google.android.apps.messaging",
            "com.android.messaging",
            "com.android.mms",
        ],
    ),
    ("gmail", &["com.google.android.gm"]),
    ("email", &["com.android.email"]),
    ("maps", &["com.google.android.apps.maps"]),
    ("youtube", &["com.google.android.youtube"]),
    ("playstore", &["com.android.vending"]),
    ("googleplay", &["com.android.vending"]),
    (
        "calendar",
        &["com.google.android.calendar", "com.android.calendar"],
    ),
    (
        "clock",
        &["com.google.android.deskclock", "com.android.deskclock"],
    ),
    (
        "calculator",
        &["com.google.android.calculator", "com.android.calculator2"],
    ),
    (
        "files",
        &[
            "com.google.android.apps.nbu.files",
            "com.google.android.documentsui",
            "com.android.documentsui",
        ],
    ),
    ("photos", &["com.google.android.apps.photos"]),
    (
        "gallery",
        &["com.android.gallery3d", "com.google.android.apps.photos"],
    ),
    ("drive", &["com.google.android.apps.docs"]),
    ("keep", &["com.google.android.keep"]),
    ("keepnotes", &["com.google.android.keep"]),
    ("recorder", &["com.google.android.apps.recorder"]),
];

fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `s` could be a package name (`a.b.c`, letters, digits and `_`).
pub(crate) fn looks_like_package(s: &str) -> bool {
    s.contains('.')
        && s.split('.').all(|seg| {
            !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Resolves `name` against the installed packages; Err is the reason, for an outcome.
pub(crate) fn resolve(name: &str, installed: &[String]) -> Result<String, String> {
    let name = name.trim();
    if installed.iter().any(|p| p == name) {
        return Ok(name.to_owned());
    }
    if looks_like_package(name) {
        return Err(format!("package {name} is not installed"));
    }
    let wanted = normalize(name);
    if wanted.is_empty() {
        return Err(format!("{name:?} is not an app name"));
    }
    if let Some((_, packages)) = KNOWN.iter().find(|(label, _)| *label == wanted)
        && let Some(p) = packages.iter().find(|p| installed.iter().any(|i| i == *p))
    {
        return Ok((*p).to_owned());
    }
    let by = |pick: &dyn Fn(&str) -> bool| -> Vec<&String> {
        installed.iter().filter(|p| pick(p)).collect()
    };
    let last = by(&|p: &str| p.rsplit('.').next().is_some_and(|s| normalize(s) == wanted));
    let any = by(&|p: &str| p.split('.').skip(1).any(|s| normalize(s) == wanted));
    let matches = if last.is_empty() { any } else { last };
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "no installed app matches {name:?}: app labels cannot be read over adb, so give the package name (`adb shell pm list packages` lists them)"
        )),
        several => Err(format!(
            "{name:?} matches several packages ({}); give the package name",
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed() -> Vec<String> {
        [
            "com.android.settings",
            "com.example.notes",
            "com.google.android.dialer",
            "org.notes.app",
            "com.android.chrome",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn resolves_packages_known_labels_and_segments() {
        let i = installed();
        assert_eq!(
            resolve("com.example.notes", &i).as_deref(),
            Ok("com.example.notes")
        );
        assert_eq!(
            resolve("Settings", &i).as_deref(),
            Ok("com.android.settings")
        );
        assert_eq!(
            resolve("Phone", &i).as_deref(),
            Ok("com.google.android.dialer")
        );
        assert_eq!(resolve(" notes ", &i).as_deref(), Ok("com.example.notes"));
        assert_eq!(
            resolve("Google Chrome", &i).as_deref(),
            Ok("com.android.chrome")
        );
        assert!(
            resolve("com.missing.app", &i)
                .unwrap_err()
                .contains("not installed")
        );
        assert!(resolve("Camera", &i).unwrap_err().contains("package name"));
        assert!(resolve("app", &i).is_ok());
        let two = vec!["com.a.notes".to_string(), "com.b.notes".to_string()];
        assert!(resolve("Notes", &two).unwrap_err().contains("several"));
    }
}
