//! JUnit XML, the test report CI systems read: `<testsuites>` with one `<testsuite>` per test
//! file and one `<testcase>` per test, a `<failure>` (an expectation not met) or an `<error>`
//! (the test could not run: no app, no model, no cached answer), the steps in `<system-out>`,
//! and times in seconds. Written by hand with XML escaping; it validates against the JUnit
//! schema Jenkins' xUnit plugin uses (tests/fixtures/junit/junit-10.xsd).

use std::fmt::Write as _;

use super::{CaseStatus, StepStatus, SuiteResult};

/// Escapes text for element content and attribute values; drops characters XML 1.0 cannot
/// hold (most control characters).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Element content: like [`escape`] but keeps line breaks readable.
fn content(text: &str) -> String {
    escape(text).replace("&#10;", "\n")
}

fn seconds(s: f64) -> String {
    format!("{:.3}", s.max(0.0))
}

/// The whole report.
pub fn render(suites: &[SuiteResult]) -> String {
    let count = |f: fn(&CaseStatus) -> bool| -> usize {
        suites
            .iter()
            .flat_map(|s| &s.cases)
            .filter(|c| f(&c.status))
            .count()
    };
    let tests: usize = suites.iter().map(|s| s.cases.len()).sum();
    let failures = count(|s| matches!(s, CaseStatus::Failed { .. }));
    let errors = count(|s| matches!(s, CaseStatus::Error { .. }));
    let time: f64 = suites.iter().map(|s| s.time_s).sum();
    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"vlad test\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{}\">",
        seconds(time)
    );
    for (i, suite) in suites.iter().enumerate() {
        let failures = suite
            .cases
            .iter()
            .filter(|c| matches!(c.status, CaseStatus::Failed { .. }))
            .count();
        let errors = suite
            .cases
            .iter()
            .filter(|c| matches!(c.status, CaseStatus::Error { .. }))
            .count();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{}\" timestamp=\"{}\" id=\"{i}\" file=\"{}\">",
            escape(&suite.name),
            suite.cases.len(),
            seconds(suite.time_s),
            escape(&suite.timestamp),
            escape(&suite.file.display().to_string()),
        );
        for case in &suite.cases {
            let _ = writeln!(
                x,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{}\">",
                escape(&case.name),
                escape(&suite.name),
                seconds(case.time_s)
            );
            match &case.status {
                CaseStatus::Passed => {}
                CaseStatus::Failed { message, detail } => {
                    let _ = writeln!(
                        x,
                        "      <failure type=\"AssertionError\" message=\"{}\">{}</failure>",
                        escape(message),
                        content(detail)
                    );
                }
                CaseStatus::Error { message, detail } => {
                    let _ = writeln!(
                        x,
                        "      <error type=\"TestError\" message=\"{}\">{}</error>",
                        escape(message),
                        content(detail)
                    );
                }
            }
            let mut out = String::new();
            for (k, step) in case.steps.iter().enumerate() {
                let mark = match step.status {
                    StepStatus::Passed => "ok",
                    StepStatus::Failed => "FAILED",
                    StepStatus::Error => "ERROR",
                    StepStatus::Skipped => "skipped",
                };
                let _ = write!(
                    out,
                    "{:>2}. [{mark}] {} ({:.2} s",
                    k + 1,
                    step.text,
                    step.time_s
                );
                if let Some(source) = &step.source {
                    let _ = write!(out, "; {source}");
                }
                out.push(')');
                if let Some(m) = &step.message {
                    let _ = write!(out, ": {m}");
                }
                out.push('\n');
            }
            if let Some(trace) = &case.trace {
                let _ = writeln!(out, "trajectory: {}", trace.display());
            }
            let _ = writeln!(x, "      <system-out>{}</system-out>", content(&out));
            x.push_str("    </testcase>\n");
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_control_characters_are_escaped() {
        assert_eq!(
            escape("a<b>&\"c\" 'd'\u{1}\n"),
            "a&lt;b&gt;&amp;&quot;c&quot; &apos;d&apos;&#10;"
        );
        assert_eq!(content("x\ny<"), "x\ny&lt;");
    }
}
