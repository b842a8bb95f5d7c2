//! The processor with the real Qwen2-VL tokenizer and chat template against transformers'
//! `Qwen2VLProcessor`: CJK, emoji, code, special tokens typed as text, system prompts, several
//! turns, and image pads expanded to their grids. The tokenizer is rebuilt from a registry
//! package by `scripts/build-qwen2vl-tokenizer.sh` (run by `scripts/test.sh`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlad::engine::{Processor, Prompt};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn real_tokenizer_renders_and_encodes_like_the_reference() {
    let dir = root().join("tests/data/qwen2vl-tokenizer");
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} is missing: run scripts/build-qwen2vl-tokenizer.sh (scripts/test.sh does)",
        dir.display()
    );
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/engine/real_tokenizer_cases.json"))
            .unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let image_cfg = &fixture["processor"]["image_processor"];
    let processor = Processor::from_model_dir(
        &dir,
        image_cfg["min_pixels"].as_u64(),
        image_cfg["max_pixels"].as_u64(),
    )
    .unwrap();
    let media_base = root().join("tests/fixtures/engine");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 6,
        "expected the full set of real-tokenizer cases"
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = Prompt::from_json_messages(&case["messages"], Path::new(&media_base)).unwrap();
        let prepared = processor
            .prepare(&prompt)
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
        let grids: Vec<[usize; 3]> = case["image_grid_thw"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|g| {
                        let g = u32s(g);
                        [g[0] as usize, g[1] as usize, g[2] as usize]
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(prepared.image_grids(), grids, "{name}: image grids");
    }
}
