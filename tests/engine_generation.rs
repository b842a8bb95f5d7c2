//! Generation behaviour beyond the reference fixtures: stop strings, streaming, EOS, reduced
//! precision, and the `vlad generate` command on a real checkpoint folder layout.

use std::process::Command;

use candle_core::DType;
use serde_json::Value;
use vlad::engine::{
    Content, FinishReason, GenerationOptions, LoadOptions, Message, Part, Prompt, Qwen2Vl,
};

#[path = "support/engine_fixtures.rs"]
mod engine_fixtures;
use engine_fixtures::{copy_model, fixtures};

fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    cases.into_iter().find(|c| c["name"] == name).expect(name)
}

fn load(model: &str, dtype: DType) -> Qwen2Vl {
    let options = LoadOptions {
        dtype,
        ..Default::default()
    };
    Qwen2Vl::load_dir(&fixtures().join(model), &options).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerationOptions {
    GenerationOptions {
        max_new_tokens,
        greedy: Some(true),
        ..Default::default()
    }
}

#[test]
fn stop_string_ends_the_text_before_it_and_streaming_agrees() {
    let c = case("image_333x217_tiny-a");
    let full = c["greedy_text"].as_str().unwrap();
    let stop = " They";
    let expected = &full[..full.find(stop).unwrap()];
    let mut model = load("tiny-a", DType::F32);
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let options = GenerationOptions {
        stop_strings: vec![stop.to_string()],
        ..greedy(12)
    };
    let mut streamed = String::new();
    let out = model
        .generate(&prompt, &options, |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(
        out.finish_reason,
        FinishReason::StopString(stop.to_string())
    );
    assert_eq!(out.text, expected);
    assert_eq!(streamed, expected);
    assert!(out.token_ids.len() < 12);
}

#[test]
fn max_tokens_and_streamed_text_match_the_reference_text() {
    let c = case("images_two_turns");
    let mut model = load("tiny-a", DType::F32);
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let mut streamed = String::new();
    let out = model
        .generate(&prompt, &greedy(12), |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::MaxTokens);
    assert_eq!(out.text, c["greedy_text"].as_str().unwrap());
    assert_eq!(streamed, out.text);
}

#[test]
fn generation_stops_at_an_end_of_sequence_token_from_generation_config() {
    let c = case("text_only_tiny-a");
    let tokens: Vec<u32> = c["greedy_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let stop_at = (2..tokens.len())
        .find(|&i| !tokens[..i].contains(&tokens[i]))
        .unwrap();
    // Declare the reference's stop_at-th greedy token an end-of-sequence token.
    let dir = copy_model("tiny-a");
    let path = dir.path().join("generation_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["eos_token_id"] = Value::from(vec![1026, tokens[stop_at]]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut model = Qwen2Vl::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let out = model.generate(&prompt, &greedy(12), |_| {}).unwrap();
    assert_eq!(out.token_ids, tokens[..=stop_at].to_vec());
    assert_eq!(out.finish_reason, FinishReason::Eos(tokens[stop_at]));
    let text_without_eos = model.processor().decode(&tokens[..stop_at]).unwrap();
    assert_eq!(out.text, text_without_eos);
}

#[test]
fn bf16_and_f16_run_and_stay_close_to_f32() {
    let c = case("image_333x217_tiny-a");
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let reference: f64 = c["top_logits"][0][1].as_f64().unwrap();
    let top_id = c["top_logits"][0][0].as_u64().unwrap() as u32;
    for dtype in [DType::BF16, DType::F16] {
        let mut model = load("tiny-a", dtype);
        let options = GenerationOptions {
            top_logits: 3,
            ..greedy(4)
        };
        let out = model.generate(&prompt, &options, |_| {}).unwrap();
        assert_eq!(out.token_ids.len(), 4, "{dtype:?}");
        assert_eq!(out.top_logits[0].0, top_id, "{dtype:?}: top token");
        let ours = out.top_logits[0].1 as f64;
        assert!(
            (ours - reference).abs() < 0.1,
            "{dtype:?}: {ours} vs {reference}"
        );
    }
}

#[test]
fn cli_generate_json_matches_the_reference() {
    let c = case("image_and_video");
    let dir = tempfile::tempdir().unwrap();
    // Paths in a messages file resolve against its folder: rewrite them as absolute paths.
    let mut messages = c["messages"].clone();
    for m in messages.as_array_mut().unwrap() {
        if let Some(parts) = m["content"].as_array_mut() {
            for p in parts {
                if let Some(img) = p.get("image").and_then(|v| v.as_str()) {
                    p["image"] = Value::from(fixtures().join(img).to_string_lossy().to_string());
                }
                if let Some(frames) = p.get_mut("video").and_then(|v| v.as_array_mut()) {
                    for f in frames {
                        *f = Value::from(
                            fixtures()
                                .join(f.as_str().unwrap())
                                .to_string_lossy()
                                .to_string(),
                        );
                    }
                }
            }
        }
    }
    let file = dir.path().join("messages.json");
    std::fs::write(&file, messages.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["generate", "--model"])
        .arg(fixtures().join(c["model"].as_str().unwrap()))
        .arg("--messages")
        .arg(&file)
        .args([
            "--greedy",
            "--max-new-tokens",
            "12",
            "--json",
            "--top-logits",
            "5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["prompt_token_ids"], c["input_ids"]);
    assert_eq!(json["token_ids"], c["greedy_tokens"]);
    assert_eq!(json["image_grid_thw"], c["image_grid_thw"]);
    assert_eq!(json["video_grid_thw"], c["video_grid_thw"]);
    assert_eq!(json["top_logits"].as_array().unwrap().len(), 5);
    assert_eq!(json["top_logits"][0][0], c["top_logits"][0][0]);
    for key in ["vision_s", "prefill_s", "decode_tokens_per_s"] {
        assert!(json["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
}

#[test]
fn cli_generate_streams_text_with_prompt_and_image() {
    let c = case("image_333x217_tiny-b");
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-b"))
        .arg("--image")
        .arg(fixtures().join("media/img_333x217.png"))
        .args([
            "--prompt",
            "Describe this image.",
            "--greedy",
            "--max-new-tokens",
            "12",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim_end_matches('\n'),
        c["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn cli_bench_reports_one_row_per_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["bench", "--config"])
        .arg(fixtures().join("tiny-b"))
        .args([
            "--sizes",
            "64x64,333x217",
            "--decode-tokens",
            "3",
            "--dtype",
            "f32",
            "--runs",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["size"], "333x217");
    // the grid the reference processor gives this size (cases.json: image_333x217_tiny-b)
    assert_eq!(rows[1]["grid_thw"], serde_json::json!([1, 16, 24]));
    for row in rows {
        for key in ["vision_s", "prefill_s", "decode_tokens_per_s", "step_s"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {row}");
        }
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["bench", "--sizes", "640", "--config"])
        .arg(fixtures().join("tiny-b"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("WIDTHxHEIGHT"));
}

/// Runs `prompt` on `model` and on a freshly loaded copy; both must agree.
fn assert_same_as_fresh(
    model: &mut Qwen2Vl,
    prompt: &Prompt,
    name: &str,
) -> vlad::engine::Generation {
    let options = GenerationOptions {
        top_logits: 5,
        ..greedy(6)
    };
    let reused = model.generate(prompt, &options, |_| {}).unwrap();
    let mut fresh_model = load(name, DType::F32);
    let fresh = fresh_model.generate(prompt, &options, |_| {}).unwrap();
    assert_eq!(fresh.reused_prompt_tokens, 0);
    assert_eq!(reused.token_ids, fresh.token_ids);
    for ((a_id, a), (b_id, b)) in reused.top_logits.iter().zip(&fresh.top_logits) {
        assert_eq!(a_id, b_id);
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    reused
}

#[test]
fn kv_cache_of_the_common_prefix_is_reused_across_calls() {
    let c = case("images_two_turns");
    let mut model = load("tiny-a", DType::F32);
    let mut prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let first = model.generate(&prompt, &greedy(6), |_| {}).unwrap();
    assert_eq!(first.reused_prompt_tokens, 0);

    // The agent's next step: the reply continues with a result and a new screenshot.
    let img = |name: &str| {
        std::sync::Arc::new(
            vlad::engine::image::load_rgb(fixtures().join("media").join(name)).unwrap(),
        )
    };
    prompt
        .messages
        .push(Message::text("assistant", first.text.clone()));
    prompt.messages.push(Message::parts(
        "user",
        vec![
            Part::Image(img("img_120x90.png")),
            Part::Text("And now?".into()),
        ],
    ));
    let second = assert_same_as_fresh(&mut model, &prompt, "tiny-a");
    let prompt_len = first.prompt_token_ids.len();
    assert!(
        second.reused_prompt_tokens >= prompt_len,
        "reused {} of a {prompt_len}-token prefix",
        second.reused_prompt_tokens
    );

    // Replace the first image by another picture of the same size: same tokens, other pixels.
    let mut changed = prompt.clone();
    let Content::Parts(parts) = &mut changed.messages[0].content else {
        panic!("parts")
    };
    let pos = parts
        .iter()
        .position(|p| matches!(p, Part::Image(_)))
        .unwrap();
    let Part::Image(old) = &parts[pos] else {
        unreachable!()
    };
    let mut other = (**old).clone();
    other
        .pixels_mut()
        .for_each(|p| p.0 = [255 - p.0[0], p.0[1], p.0[2]]);
    parts[pos] = Part::Image(std::sync::Arc::new(other));
    let third = assert_same_as_fresh(&mut model, &changed, "tiny-a");
    let first_pad = third
        .prompt_token_ids
        .iter()
        .position(|&t| t == model.config().image_token_id.unwrap())
        .unwrap();
    assert!(
        third.reused_prompt_tokens <= first_pad,
        "reuse must stop before the changed image"
    );
}
