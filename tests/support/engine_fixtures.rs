//! The engine's committed reference fixtures (`tests/fixtures/engine`), shared by the engine tests,
//! and the device those tests run on.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Device;

/// The folder holding the tiny checkpoints, media and `cases.json`. Found through the
/// `CARGO_MANIFEST_DIR` of the run (cargo sets it; set it to the checkout when a test binary
/// runs on its own, e.g. carried to a GPU machine), else the one the tests were built in.
pub fn fixtures() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures/engine")
}

/// The device the engine's parity tests run on: the CPU, or with `VLAD_TEST_DEVICE=cuda` (a
/// build with `--features cuda`) the first GPU, so the same assertions check the CUDA path.
pub fn test_device() -> Device {
    match std::env::var("VLAD_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        // one stream for every thread's work, as `vlad --device cuda` opens it
        Ok("cuda") => Device::new_cuda_with_stream(0).unwrap_or_else(|e| {
            panic!("VLAD_TEST_DEVICE=cuda: cannot open CUDA device 0 ({e}); build the tests with --features cuda on a machine with an NVIDIA GPU")
        }),
        Ok(other) => panic!("VLAD_TEST_DEVICE={other:?}: expected cpu or cuda"),
    }
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
