//! The embedded engine against the reference implementation (transformers 4.57, see
//! `tests/fixtures/generate_engine_fixtures.py`): for every recorded case, the rendered prompt,
//! token ids, media grids, pixel values, vision features, M-RoPE positions, first-step logits and
//! 12 greedy tokens. On the CPU by default; `VLAD_TEST_DEVICE=cuda` (tests built with
//! `--features cuda`) runs the same assertions on the first GPU.

use candle_core::DType;
use serde_json::Value;
use vlad::engine::{GenerationOptions, LoadOptions, Prompt, Qwen2Vl};

#[path = "support/engine_fixtures.rs"]
mod engine_fixtures;
use engine_fixtures::{fixtures, test_device};

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    serde_json::from_str::<Vec<Value>>(&text).expect("cases.json is a list")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn grids(v: &Value) -> Vec<[usize; 3]> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|g| {
                    let g = u32s(g);
                    [g[0] as usize, g[1] as usize, g[2] as usize]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn load(case: &Value) -> Qwen2Vl {
    let kwargs = &case["processor_kwargs"];
    let options = LoadOptions {
        dtype: DType::F32,
        device: test_device(),
        min_pixels: kwargs["min_pixels"].as_u64(),
        max_pixels: kwargs["max_pixels"].as_u64(),
        ..Default::default()
    };
    let dir = fixtures().join(case["model"].as_str().unwrap());
    Qwen2Vl::load_dir(&dir, &options).unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

fn prompt(case: &Value) -> Prompt {
    Prompt::from_json_messages(&case["messages"], &fixtures()).unwrap()
}

fn assert_close(name: &str, what: &str, ours: f64, theirs: f64, rel: f64, abs: f64) {
    let tol = abs + rel * theirs.abs();
    assert!(
        (ours - theirs).abs() <= tol,
        "{name}: {what}: ours {ours} reference {theirs} (tolerance {tol})"
    );
}

fn check_checksums(
    name: &str,
    what: &str,
    values: &[f32],
    rows: usize,
    reference: &Value,
    rel: f64,
) {
    if reference.is_null() {
        assert!(values.is_empty(), "{name}: {what}: reference has none");
        return;
    }
    let shape = u32s(&reference["shape"]);
    assert_eq!(shape[0] as usize, rows, "{name}: {what} rows");
    assert_eq!(
        values.len(),
        rows * shape[1] as usize,
        "{name}: {what} size"
    );
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    let abs_sum: f64 = values.iter().map(|&v| (v as f64).abs()).sum();
    let n = values.len() as f64;
    assert_close(
        name,
        &format!("{what} sum"),
        sum,
        reference["sum"].as_f64().unwrap(),
        rel,
        1e-3 * n.sqrt(),
    );
    assert_close(
        name,
        &format!("{what} abs_sum"),
        abs_sum,
        reference["abs_sum"].as_f64().unwrap(),
        rel,
        1e-3 * n.sqrt(),
    );
    for (i, (o, r)) in values.iter().zip(f64s(&reference["first"])).enumerate() {
        assert_close(
            name,
            &format!("{what} first[{i}]"),
            *o as f64,
            r,
            rel.max(1e-5),
            1e-5,
        );
    }
}

#[test]
fn processor_matches_the_reference() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let model = load(&case);
        let prepared = model
            .prepare(&prompt(&case))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            prepared.text,
            case["prompt_text"].as_str().unwrap(),
            "{name}: prompt text"
        );
        assert_eq!(
            prepared.input_ids,
            u32s(&case["input_ids"]),
            "{name}: input ids"
        );
        assert_eq!(
            prepared.image_grids(),
            grids(&case["image_grid_thw"]),
            "{name}: image grids"
        );
        assert_eq!(
            prepared.video_grids(),
            grids(&case["video_grid_thw"]),
            "{name}: video grids"
        );
        // Pillow rounds to u8 between its two resampling passes; our resize is bit-exact with it,
        // so the values agree to float rounding either way.
        let rel = 1e-5;
        for (what, media, reference) in [
            ("pixel_values", &prepared.images, &case["pixel_values"]),
            (
                "pixel_values_videos",
                &prepared.videos,
                &case["pixel_values_videos"],
            ),
        ] {
            let values: Vec<f32> = media
                .iter()
                .flat_map(|m| m.values.iter().copied())
                .collect();
            let rows = media.iter().map(|m| m.rows).sum();
            check_checksums(name, what, &values, rows, reference, rel);
        }
        let positions = &case["position_ids"];
        for axis in 0..3 {
            let theirs: Vec<i64> = positions[axis]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(
                prepared.positions.rows[axis], theirs,
                "{name}: position row {axis}"
            );
        }
        assert_eq!(
            prepared.positions.delta,
            case["rope_delta"].as_i64().unwrap(),
            "{name}: rope delta"
        );
    }
}

#[test]
fn vision_tower_matches_the_reference() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let reference = &case["vision_embeds"];
        if reference.is_null() {
            continue;
        }
        let model = load(&case);
        let prepared = model.prepare(&prompt(&case)).unwrap();
        let mut values = Vec::new();
        let mut rows = 0;
        for media in [&prepared.images, &prepared.videos] {
            if let Some(t) = model.encode_media(media).unwrap() {
                rows += t.dim(0).unwrap();
                values.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        check_checksums(name, "vision_embeds", &values, rows, reference, 1e-4);
    }
}

#[test]
fn logits_and_greedy_tokens_match_the_reference() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let mut model = load(&case);
        let top: Vec<(u32, f64)> = case["top_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
            .collect();
        let expected_tokens = u32s(&case["greedy_tokens"]);
        let options = GenerationOptions {
            max_new_tokens: 12,
            greedy: Some(true),
            repetition_penalty: case["generation"]["repetition_penalty"]
                .as_f64()
                .map(|v| v as f32),
            top_logits: top.len(),
            ..Default::default()
        };
        let out = model
            .generate(&prompt(&case), &options, |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // f32 throughout; the resize is bit-exact with Pillow, so one tolerance holds for all.
        let rel = 1e-4;
        for (i, ((oid, ov), (rid, rv))) in out.top_logits.iter().zip(&top).enumerate() {
            assert_close(
                name,
                &format!("logit #{i} (token {rid})"),
                *ov as f64,
                *rv,
                rel,
                1e-5,
            );
            if i < 5 {
                assert_eq!(oid, rid, "{name}: top-{i} token");
            }
        }
        assert_eq!(out.token_ids, expected_tokens, "{name}: greedy tokens");
    }
}
