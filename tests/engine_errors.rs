//! Bad inputs to the engine get errors that name the file, the tensor and the fix — never a panic.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vlad::engine::{LoadOptions, Qwen2Vl};

#[path = "support/engine_fixtures.rs"]
mod engine_fixtures;
use engine_fixtures::{copy_model, fixtures};

fn load_error(dir: &Path) -> String {
    match Qwen2Vl::load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error should mention {w:?}: {err}");
    }
}

#[test]
fn missing_files_are_named() {
    for (file, words) in [
        ("config.json", vec!["config.json"]),
        ("tokenizer.json", vec!["tokenizer.json", "copy"]),
        ("model.safetensors", vec!["safetensors"]),
        ("chat_template.json", vec!["chat template"]),
    ] {
        let dir = copy_model("tiny-a");
        std::fs::remove_file(dir.path().join(file)).unwrap();
        if file == "chat_template.json" {
            // the template may also live in tokenizer_config.json: take it out there too
            let path = dir.path().join("tokenizer_config.json");
            let mut cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            cfg.as_object_mut().unwrap().remove("chat_template");
            std::fs::write(&path, cfg.to_string()).unwrap();
        }
        assert_mentions(&load_error(dir.path()), &words);
    }
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_model("tiny-b");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    assert_mentions(&load_error(dir.path()), &[&shard, "download"]);
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = copy_model("tiny-a");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors", "truncated"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_file() {
    let dir = copy_model("tiny-a");
    edit_config(dir.path(), |c| c["intermediate_size"] = Value::from(130));
    assert_mentions(
        &load_error(dir.path()),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "model.safetensors",
            "shape",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_model("tiny-a");
    edit_config(dir.path(), |c| c["num_hidden_layers"] = Value::from(3));
    assert_mentions(&load_error(dir.path()), &["model.layers.2.", "missing"]);
}

#[test]
fn unknown_model_type_is_refused_with_the_alternative() {
    let dir = copy_model("tiny-a");
    edit_config(dir.path(), |c| c["model_type"] = Value::from("llava"));
    assert_mentions(&load_error(dir.path()), &["llava", "qwen2_vl", "openai"]);
}

#[test]
fn inconsistent_special_tokens_are_refused() {
    let dir = copy_model("tiny-a");
    edit_config(dir.path(), |c| c["image_token_id"] = Value::from(5));
    assert_mentions(
        &load_error(dir.path()),
        &["image_token_id", "tokenizer.json"],
    );
}

#[test]
fn bad_pixel_budget_is_refused() {
    let options = LoadOptions {
        min_pixels: Some(1_000_000),
        max_pixels: Some(1000),
        ..Default::default()
    };
    let err = Qwen2Vl::load_dir(&fixtures().join("tiny-a"), &options)
        .err()
        .unwrap()
        .to_string();
    assert_mentions(&err, &["min_pixels", "max_pixels"]);
}

fn vlad(args: &[&str], envs: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlad"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn hub_id_without_network_says_how_to_pass_a_folder() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlad"));
    cmd.args([
        "generate",
        "--model",
        "example-org/no-such-model",
        "--prompt",
        "hi",
    ])
    .env("HF_HOME", home.path())
    .env("HF_ENDPOINT", "http://127.0.0.1:9");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_mentions(
        &err,
        &["example-org/no-such-model", "--model /path/to/folder"],
    );
}

#[test]
fn cli_errors_name_the_bad_input() {
    let model = fixtures().join("tiny-a");
    let model = model.to_str().unwrap();
    let (ok, err) = vlad(
        &[
            "generate",
            "--model",
            model,
            "--image",
            "/no/such.png",
            "--prompt",
            "x",
        ],
        &[],
    );
    assert!(!ok);
    assert_mentions(&err, &["/no/such.png"]);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("m.json");
    std::fs::write(
        &bad,
        r#"[{"role": "user", "content": [{"type": "picture", "image": "a.png"}]}]"#,
    )
    .unwrap();
    let (ok, err) = vlad(
        &[
            "generate",
            "--model",
            model,
            "--messages",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert_mentions(&err, &["m.json", "picture", "\"image\""]);

    let not_png = dir.path().join("x.png");
    std::fs::write(&not_png, b"not an image").unwrap();
    let (ok, err) = vlad(
        &[
            "generate",
            "--model",
            model,
            "--image",
            not_png.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &[],
    );
    assert!(!ok);
    assert_mentions(&err, &["x.png"]);

    let (ok, err) = vlad(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "x",
            "--max-new-tokens",
            "0",
        ],
        &[],
    );
    assert!(!ok);
    assert_mentions(&err, &["max_new_tokens"]);
}
