//! The library side of `vlad parse`: read a reply, parse it for a model family, map its points
//! onto a screen and give the JSON object the command prints. The command line itself (clap)
//! lives in `main.rs`.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{CoordError, CoordMap, ModelFamily, Protocol, Size};

/// The options of `vlad parse`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseOptions {
    pub family: ModelFamily,
    /// The image the model saw (after resizing).
    pub image_size: Size,
    /// The screen to map onto; the image size when `None`.
    pub screen_size: Option<Size>,
    /// Environment pixels per screen pixel (default 1).
    pub scale: f64,
    /// Tool names the model may call besides the built-ins.
    pub tools: Vec<String>,
}

impl ParseOptions {
    pub fn new(family: ModelFamily, image_size: Size) -> Self {
        Self {
            family,
            image_size,
            screen_size: None,
            scale: 1.0,
            tools: Vec::new(),
        }
    }
}

/// A usage or input error of `vlad parse` (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read standard input: {0}")]
    Stdin(std::io::Error),
    #[error(transparent)]
    Coords(#[from] CoordError),
}

/// Parses `input` as one model reply and returns the JSON object `vlad parse` prints:
/// `thought`, `actions` (screen pixels), `boxes`, `answer`, `errors`. Errors in the reply are
/// part of the result; only unusable options are an `Err`.
pub fn parse_command(options: &ParseOptions, input: &str) -> Result<Value, CliError> {
    let screen = options.screen_size.unwrap_or(options.image_size);
    let space = options.family.coord_space(options.image_size);
    let map = CoordMap::new(space, screen, options.scale, (0, 0))?;
    let protocol = Protocol::new(options.family).with_tools(options.tools.iter().cloned());
    Ok(protocol.parse(input).map(&map).to_json())
}

/// Reads the reply from a file, or from standard input for `None` or `-`. Text that is not
/// UTF-8 is read with replacement characters rather than refused.
pub fn read_input(path: Option<&Path>) -> Result<String, CliError> {
    let mut bytes = Vec::new();
    match path {
        Some(p) if p != Path::new("-") => {
            bytes = std::fs::read(p).map_err(|source| CliError::Read {
                path: p.to_path_buf(),
                source,
            })?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(CliError::Stdin)?;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_issue_example() -> Result<(), CliError> {
        let mut options = ParseOptions::new(ModelFamily::Qwen2Vl, "1000x2000".parse()?);
        options.screen_size = Some("1080x2400".parse()?);
        let out = parse_command(&options, "*FUNCTION*: Tap *ARGS*: {\"point\": (348,291)}")?;
        assert_eq!(
            out,
            json!({
                "thought": null,
                "actions": [{"action": "click", "x": 376, "y": 698}],
                "boxes": [],
                "answer": null,
                "errors": []
            })
        );
        Ok(())
    }

    #[test]
    fn a_bad_scale_is_a_usage_error() -> Result<(), CliError> {
        let mut options = ParseOptions::new(ModelFamily::Qwen2Vl, "10x10".parse()?);
        options.scale = -1.0;
        assert!(matches!(
            parse_command(&options, ""),
            Err(CliError::Coords(_))
        ));
        Ok(())
    }
}
