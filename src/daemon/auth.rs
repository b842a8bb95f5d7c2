//! Bearer-token authentication: the token is generated on first start, kept in a file only its
//! owner can read (mode 0600), and required on every API request unless auth is disabled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Why the token file could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create the token file {}: {source}; pass --token-file PATH or --no-auth", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {} is readable by others (mode {mode:o}); run `chmod 600 {}`", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the token file {} is empty or not one line of text; delete it and a new token is made", path.display())]
    Malformed { path: PathBuf },
    #[error("no config directory for the token file; pass --token-file PATH")]
    NoConfigDir,
}

/// Where the token lives by default: `<config dir>/vlad/token`.
pub fn default_token_path() -> Result<PathBuf, AuthError> {
    dirs::config_dir()
        .map(|d| d.join("vlad").join("token"))
        .ok_or(AuthError::NoConfigDir)
}

/// Reads the token in `path`, or creates the file (mode 0600, parent folders 0700) with a new
/// random 256-bit token when it does not exist.
pub fn load_or_create_token(path: &Path) -> Result<String, AuthError> {
    let io = |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            let token = text.trim();
            if token.is_empty() || token.contains(char::is_whitespace) {
                return Err(AuthError::Malformed {
                    path: path.to_path_buf(),
                });
            }
            Ok(token.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent).map_err(io)?;
            }
            let bytes: [u8; 32] = rand::random();
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = create_private_file(path).map_err(io)?;
            file.write_all(format!("{token}\n").as_bytes())
                .map_err(io)?;
            tracing::info!("created a new API token in {}", path.display());
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| AuthError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), AuthError> {
    Ok(())
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: lets a request through when auth is off or it carries `Authorization: Bearer TOKEN`.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same(t.as_bytes(), expected.as_bytes()) => next.run(request).await,
        Some(_) => {
            unauthorized("the bearer token is wrong; use the one in the daemon's token file")
        }
        None => unauthorized(
            "missing `Authorization: Bearer TOKEN`; the token is in the daemon's token file (see `vlad serve --help`)",
        ),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token");
        let token = load_or_create_token(&path).unwrap();
        assert_eq!(token.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(load_or_create_token(&path).unwrap(), token);
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_token(&path),
            Err(AuthError::Permissions { .. })
        ));
    }

    #[test]
    fn comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
