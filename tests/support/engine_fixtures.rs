//! The engine's committed reference fixtures (`tests/fixtures/engine`), shared by the engine tests.

use std::path::{Path, PathBuf};

/// The folder holding the tiny checkpoints, media and `cases.json`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine")
}

/// A copy of a fixture model folder, to edit without touching the committed one.
pub fn copy_model(model: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}
