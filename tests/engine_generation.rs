//! Generation behaviour beyond the reference fixtures: stop strings, streaming, EOS, reduced
//! precision, and the `vlad generate` command on a real checkpoint folder layout.

use std::process::Command;

use candle_core::DType;
use serde_json::Value;
use vlad::engine::{
    Content, FinishReason, GenerationOptions, LoadOptions, Message, Part, Prompt, Quantization,
    Qwen2Vl,
};

#[path = "support/engine_fixtures.rs"]
mod engine_fixtures;
use engine_fixtures::{copy_model, fixtures, test_device};

fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    cases.into_iter().find(|c| c["name"] == name).expect(name)
}

fn load(model: &str, dtype: DType) -> Qwen2Vl {
    let options = LoadOptions {
        dtype,
        device: test_device(),
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
    // pipelined, the end-of-sequence token is fed before it is known: same reply
    model.set_decode_pipelining(Some(true));
    let piped = model.generate(&prompt, &greedy(12), |_| {}).unwrap();
    assert_eq!(piped.token_ids, out.token_ids);
    assert_eq!(piped.finish_reason, out.finish_reason);
    assert_eq!(piped.text, out.text);
}

#[test]
fn pipelined_decoding_gives_the_same_replies_and_leaves_a_reusable_cache() {
    let mut piped = load("tiny-a", DType::F32);
    piped.set_decode_pipelining(Some(true));
    // ended by a stop string: the token after it was fed ahead and must leave the cache
    let c = case("image_333x217_tiny-a");
    let full = c["greedy_text"].as_str().unwrap();
    let stop = " They";
    let mut prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let options = GenerationOptions {
        stop_strings: vec![stop.to_string()],
        ..greedy(12)
    };
    let mut streamed = String::new();
    let out = piped
        .generate(&prompt, &options, |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(
        out.finish_reason,
        FinishReason::StopString(stop.to_string())
    );
    assert_eq!(out.text, &full[..full.find(stop).unwrap()]);
    assert_eq!(streamed, out.text);

    // the next turn reuses what that call left in the cache, and agrees with a fresh model
    prompt
        .messages
        .push(Message::text("assistant", out.text.clone()));
    prompt
        .messages
        .push(Message::text("user", "And what is on the left?"));
    let next = assert_same_as_fresh(&mut piped, &prompt, "tiny-a");
    assert!(
        next.reused_prompt_tokens >= out.prompt_token_ids.len(),
        "reused {} of {}",
        next.reused_prompt_tokens,
        out.prompt_token_ids.len()
    );

    // ended by the token budget: nothing is fed ahead of the last token
    let c = case("images_two_turns");
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let out = piped.generate(&prompt, &greedy(12), |_| {}).unwrap();
    assert_eq!(out.finish_reason, FinishReason::MaxTokens);
    assert_eq!(out.text, c["greedy_text"].as_str().unwrap());
    assert_eq!(Value::from(out.token_ids.clone()), c["greedy_tokens"]);

    // in bf16 too, where on a GPU the fed token stays on the device
    let mut plain = load("tiny-a", DType::BF16);
    plain.set_decode_pipelining(Some(false));
    let mut piped = load("tiny-a", DType::BF16);
    piped.set_decode_pipelining(Some(true));
    let expected = plain.generate(&prompt, &greedy(12), |_| {}).unwrap();
    let out = piped.generate(&prompt, &greedy(12), |_| {}).unwrap();
    assert_eq!(out.token_ids, expected.token_ids);
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

/// How far a model loaded with `options` is from the reference (f32) on the plain parity cases
/// of one fixture model.
struct Deviation {
    cases: usize,
    /// Largest first-step top-20 logit difference over the largest |logit|.
    worst: f64,
    /// The same over the spread of the top 20.
    worst_of_spread: f64,
    same_first_token: usize,
    /// Greedy tokens equal to the reference's before the first difference, of all.
    same_tokens: usize,
    all_tokens: usize,
    weight_bytes: usize,
}

fn deviation(name: &str, options: &LoadOptions) -> Deviation {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut model = Qwen2Vl::load_dir(&fixtures().join(name), options).unwrap();
    let mut d = Deviation {
        cases: 0,
        worst: 0.0,
        worst_of_spread: 0.0,
        same_first_token: 0,
        same_tokens: 0,
        all_tokens: 0,
        weight_bytes: model.decode_weight_bytes(),
    };
    let plain = cases.iter().filter(|c| {
        c["model"] == name
            && c.get("generation").is_none()
            && c["processor_kwargs"]
                .as_object()
                .is_none_or(|o| o.is_empty())
    });
    for c in plain {
        d.cases += 1;
        let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
        let expected: Vec<u64> = c["greedy_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let generation = GenerationOptions {
            top_logits: 20,
            ignore_eos: true,
            ..greedy(expected.len())
        };
        let out = model.generate(&prompt, &generation, |_| {}).unwrap();
        let ours: std::collections::HashMap<u32, f32> = out.top_logits.iter().copied().collect();
        let reference = c["top_logits"].as_array().unwrap();
        let logit = |p: &Value| p[1].as_f64().unwrap();
        let spread = logit(&reference[0]) - logit(reference.last().unwrap());
        let scale = reference
            .iter()
            .map(|p| logit(p).abs())
            .fold(0f64, f64::max);
        for pair in reference {
            if let Some(got) = ours.get(&(pair[0].as_u64().unwrap() as u32)) {
                let diff = (*got as f64 - logit(pair)).abs();
                d.worst = d.worst.max(diff / scale.max(1e-6));
                d.worst_of_spread = d.worst_of_spread.max(diff / spread.max(1e-6));
            }
        }
        if out.top_logits[0].0 as u64 == reference[0][0].as_u64().unwrap() {
            d.same_first_token += 1;
        }
        d.same_tokens += out
            .token_ids
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| **a as u64 == **b)
            .count();
        d.all_tokens += expected.len();
    }
    d
}

/// The cost of `--quantize q8_0` on the parity fixtures, with bf16 weights as the yardstick:
/// printed (`--nocapture`) and bounded.
#[test]
fn q8_0_language_model_stays_close_to_the_reference() {
    for name in ["tiny-a", "tiny-b"] {
        let f32_bytes = load(name, DType::F32).decode_weight_bytes();
        let q8 = deviation(
            name,
            &LoadOptions {
                quantize: Some(Quantization::Q8_0),
                device: test_device(),
                ..Default::default()
            },
        );
        let bf16 = deviation(
            name,
            &LoadOptions {
                dtype: DType::BF16,
                device: test_device(),
                ..Default::default()
            },
        );
        for (label, d) in [("q8_0", &q8), ("bf16", &bf16)] {
            eprintln!(
                "{label} on {name} ({} cases): worst first-step top-20 logit deviation {:.4} of the \
                 largest |logit| ({:.3} of the top-20 spread); same first token {}/{}; {}/{} greedy \
                 tokens as the reference before the first difference; LM weights {} bytes ({} in f32)",
                d.cases,
                d.worst,
                d.worst_of_spread,
                d.same_first_token,
                d.cases,
                d.same_tokens,
                d.all_tokens,
                d.weight_bytes,
                f32_bytes
            );
        }
        assert!(q8.cases >= 3, "{name}: only {} plain cases", q8.cases);
        assert!(
            q8.weight_bytes * 3 < f32_bytes,
            "{name}: {} bytes",
            q8.weight_bytes
        );
        assert!(q8.worst < 0.08, "{name}: worst deviation {}", q8.worst);
        assert!(
            q8.same_first_token + 1 >= q8.cases,
            "{name}: same first token in {}/{}",
            q8.same_first_token,
            q8.cases
        );
    }
}

#[test]
fn a_set_cancel_flag_stops_generation_between_tokens() {
    let c = case("image_333x217_tiny-a");
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let mut model = load("tiny-a", DType::F32);
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = GenerationOptions {
        cancel: Some(flag.clone()),
        ignore_eos: true,
        ..greedy(12)
    };
    let out = model
        .generate(&prompt, &options, |_| {
            flag.store(true, std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(
        !out.token_ids.is_empty() && out.token_ids.len() < 12,
        "{:?}",
        out.token_ids
    );
    // The model is usable afterwards and gives the reference's text again.
    flag.store(false, std::sync::atomic::Ordering::Relaxed);
    let again = model.generate(&prompt, &options, |_| {}).unwrap();
    assert_eq!(again.text, c["greedy_text"].as_str().unwrap());
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
        .args(["generate", "--dtype", "f32", "--model"])
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
    for key in [
        "preprocess_s",
        "vision_s",
        "prefill_s",
        "decode_tokens_per_s",
    ] {
        assert!(json["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
}

#[test]
fn cli_generate_streams_text_with_prompt_and_image() {
    let c = case("image_333x217_tiny-b");
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["generate", "--dtype", "f32", "--model"])
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

/// `vlad bench --config FIXTURE ARGS --json`, which must succeed; its rows.
fn bench_json(model: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vlad"))
        .args(["bench", "--config"])
        .arg(fixtures().join(model))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cli_bench_reports_one_row_per_size() {
    let rows = bench_json(
        "tiny-b",
        &[
            "--sizes",
            "64x64,333x217",
            "--decode-tokens",
            "3",
            "--dtype",
            "f32",
            "--runs",
            "0",
        ],
    );
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["size"], "333x217");
    // the grid the reference processor gives this size (cases.json: image_333x217_tiny-b)
    assert_eq!(rows[1]["grid_thw"], serde_json::json!([1, 16, 24]));
    for row in rows {
        for key in [
            "preprocess_s",
            "vision_s",
            "prefill_s",
            "decode_tokens_per_s",
            "step_s",
            "decode_weight_bytes",
            "decode_gb_per_s",
        ] {
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

#[test]
fn cli_bench_profile_times_every_phase_of_a_step() {
    // tiny-a: 2 vision blocks, 2 decoder layers
    let rows = bench_json(
        "tiny-a",
        &[
            "--sizes",
            "112x84",
            "--decode-tokens",
            "3",
            "--dtype",
            "f32",
            "--runs",
            "2",
            "--profile",
        ],
    );
    let row = &rows[0];
    let phases: std::collections::HashMap<&str, (f64, f64)> = row["profile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap(),
                (p["seconds"].as_f64().unwrap(), p["calls"].as_f64().unwrap()),
            )
        })
        .collect();
    let calls = |name: &str| {
        phases
            .get(name)
            .unwrap_or_else(|| panic!("{name}: {row}"))
            .1
    };
    // per run: one prefill and 3 decode steps (4 tokens, the last one not fed back)
    assert_eq!(calls("vision.attention.attend"), 2.0);
    assert_eq!(calls("vision.mlp"), 2.0);
    assert_eq!(calls("text.attention.attend"), 2.0 * 4.0);
    assert_eq!(calls("text.mlp.gate_up"), 2.0 * 4.0);
    assert_eq!(calls("text.lm_head"), 4.0);
    assert_eq!(calls("sampling"), 4.0);
    assert!(phases.contains_key("other"), "{row}");
    // the phases and `other` add up to the step as the runs took it (vision, prefill, decode and
    // the processing around them)
    let total: f64 = phases.values().map(|(s, _)| s).sum();
    let timed = row["vision_s"].as_f64().unwrap() + row["prefill_s"].as_f64().unwrap();
    assert!(total >= timed * 0.99, "{total} vs {timed}: {row}");
    // plain runs carry no profile
    let plain = bench_json(
        "tiny-a",
        &[
            "--sizes",
            "112x84",
            "--decode-tokens",
            "1",
            "--dtype",
            "f32",
        ],
    );
    assert!(plain[0].get("profile").is_none(), "{plain}");
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

#[test]
fn vision_outputs_of_an_image_seen_before_are_reused_after_a_changed_prefix() {
    let c = case("image_333x217_tiny-a");
    let mut model = load("tiny-a", DType::F32);
    let prompt = Prompt::from_json_messages(&c["messages"], &fixtures()).unwrap();
    let first = model.generate(&prompt, &greedy(4), |_| {}).unwrap();
    assert_eq!(first.reused_media, 0);

    // Same picture behind a different system prompt: the KV prefix cannot be reused, the
    // vision output can.
    let mut moved = prompt.clone();
    moved
        .messages
        .insert(0, Message::text("system", "You operate a computer."));
    let second = assert_same_as_fresh(&mut model, &moved, "tiny-a");
    assert_eq!(second.reused_media, 1);
    assert!(second.reused_prompt_tokens < first.prompt_token_ids.len() / 2);

    // A model told not to reuse anything (benchmarks) runs the vision tower again.
    let options = GenerationOptions {
        reuse_cache: false,
        ..greedy(2)
    };
    assert_eq!(
        model
            .generate(&moved, &options, |_| {})
            .unwrap()
            .reused_media,
        0
    );
}

#[test]
fn cli_bench_history_steps_reuse_the_previous_steps() {
    let rows = bench_json(
        "tiny-a",
        &[
            "--sizes",
            "112x84",
            "--decode-tokens",
            "3",
            "--dtype",
            "f32",
            "--history-steps",
            "3",
        ],
    );
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["reused_prompt_tokens"], 0);
    for pair in rows.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let grown = after["prompt_tokens"].as_u64().unwrap();
        assert!(grown > before["prompt_tokens"].as_u64().unwrap());
        // Everything up to the previous reply is reused; only the new turn is computed.
        assert!(
            after["reused_prompt_tokens"].as_u64().unwrap()
                >= before["prompt_tokens"].as_u64().unwrap(),
            "{after}"
        );
    }
}
