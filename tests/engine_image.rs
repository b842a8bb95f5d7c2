//! The image processor against Pillow and numpy: fixtures made by
//! `tests/fixtures/pillow_bicubic/generate.py` (Pillow 13, a line-for-line port of transformers'
//! slow `Qwen2VLImageProcessor`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use vlad::engine::image::{
    PillowCompat, ProcessorConfig, RgbImage, VideoConfig, VideoNormalize, load_rgb,
    preprocess_image, preprocess_video, resize_bicubic, resize_bicubic_compat,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow_bicubic")
}

fn manifest() -> Result<Value> {
    let text = std::fs::read_to_string(dir().join("manifest.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn cases<'a>(m: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    m[key]
        .as_array()
        .with_context(|| format!("manifest has no {key} list"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v[key]
        .as_str()
        .with_context(|| format!("{key} missing in {v}"))
}

fn usizes(v: &Value) -> Result<Vec<usize>> {
    v.as_array()
        .context("not a list")?
        .iter()
        .map(|x| x.as_u64().map(|n| n as usize).context("not a number"))
        .collect()
}

fn compat(name: &str) -> Result<PillowCompat> {
    Ok(match name {
        "pillow13" => PillowCompat::Pillow13,
        "pillow12" => PillowCompat::Pillow12,
        other => bail!("unknown Pillow release {other}"),
    })
}

fn fnv1a64(values: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[test]
fn bicubic_resize_is_bit_exact_with_pillow() -> Result<()> {
    let m = manifest()?;
    let mut compared = 0;
    for case in cases(&m, "resize")? {
        let name = str_of(case, "name")?;
        let input = load_rgb(dir().join(format!("{name}_in.png")))?;
        let out = usizes(&case["out"])?;
        let expected = case["expected"].as_object().context("expected")?;
        for (release, file) in expected {
            let want = load_rgb(dir().join(file.as_str().context("file name")?))?;
            let (w, h) = (out[0] as u32, out[1] as u32);
            let got = resize_bicubic_compat(&input, w, h, compat(release)?);
            ensure!(got.dimensions() == want.dimensions(), "{name}: size");
            let differing = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            ensure!(
                differing == 0,
                "{name} ({release}): {differing} bytes differ"
            );
            if release == "pillow13" {
                ensure!(
                    resize_bicubic(&input, w, h) == got,
                    "{name}: default is Pillow 13"
                );
            }
            compared += 1;
        }
    }
    ensure!(compared >= 14, "only {compared} comparisons");
    Ok(())
}

#[test]
fn preprocess_is_bit_exact_with_numpy_reference() -> Result<()> {
    let m = manifest()?;
    for case in cases(&m, "preprocess")? {
        let name = str_of(case, "name")?;
        let frames = case["frames"]
            .as_array()
            .context("frames")?
            .iter()
            .map(|f| Ok(load_rgb(dir().join(f.as_str().context("frame name")?))?))
            .collect::<Result<Vec<_>>>()?;
        let config_json = case["config"].to_string();
        let pillow = compat(str_of(case, "pillow")?)?;
        let out = match str_of(case, "kind")? {
            "image" => {
                let config = ProcessorConfig {
                    pillow,
                    ..ProcessorConfig::from_json_str(&config_json)?
                };
                preprocess_image(&frames[0], &config)?
            }
            _ => {
                let mut config = VideoConfig::from_json_str(&config_json)?;
                config.frame.pillow = pillow;
                config.normalize = match str_of(case, "normalize")? {
                    "fused" => VideoNormalize::Fused,
                    _ => VideoNormalize::Separate,
                };
                preprocess_video(&frames, &config)?
            }
        };
        ensure!(
            out.grid_thw.to_vec() == usizes(&case["grid_thw"])?,
            "{name}: grid"
        );
        ensure!(
            out.rows == case["rows"].as_u64().context("rows")? as usize,
            "{name}: rows"
        );
        ensure!(out.row_len == 1176, "{name}: row_len");
        ensure!(out.values.len() == out.rows * out.row_len, "{name}: len");
        let bits = |v: &[f32]| {
            v.iter()
                .map(|x| format!("{:08x}", x.to_bits()))
                .collect::<Vec<_>>()
        };
        let want_bits = |key: &str| -> Result<Vec<String>> {
            let list = case[key].as_array().with_context(|| key.to_string())?;
            Ok(list
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect())
        };
        let n = out.values.len();
        ensure!(
            bits(&out.values[..4]) == want_bits("first_bits")?,
            "{name}: first values"
        );
        ensure!(
            bits(&out.values[n - 4..]) == want_bits("last_bits")?,
            "{name}: last values"
        );
        let hash = format!("{:016x}", fnv1a64(&out.values));
        ensure!(
            hash == str_of(case, "fnv1a64")?,
            "{name}: checksum {hash} differs"
        );
    }
    Ok(())
}

#[test]
fn decoding_converts_to_rgb_like_pillow() -> Result<()> {
    let m = manifest()?;
    for case in cases(&m, "decode")? {
        let file = str_of(case, "file")?;
        let got = load_rgb(dir().join(file))?;
        let want = load_rgb(dir().join(str_of(case, "expected")?))?;
        ensure!(got.dimensions() == want.dimensions(), "{file}: size");
        let tolerance = case["tolerance"].as_u64().context("tolerance")? as u8;
        let worst = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        ensure!(
            worst <= tolerance,
            "{file}: off by {worst} (allowed {tolerance})"
        );
    }
    Ok(())
}

#[test]
fn errors_name_the_input_and_the_remedy() -> Result<()> {
    let tiny = RgbImage::new(20, 400);
    let err = preprocess_image(&tiny, &ProcessorConfig::default())
        .err()
        .context("20 px wide must fail")?
        .to_string();
    ensure!(
        err.contains("20x400") && err.contains("at least 28"),
        "{err}"
    );
    let strip = RgbImage::new(6000, 28);
    let err = preprocess_image(&strip, &ProcessorConfig::default())
        .err()
        .context("aspect 214 must fail")?
        .to_string();
    ensure!(err.contains("6000x28") && err.contains("200"), "{err}");
    let err = preprocess_video(&[], &VideoConfig::default())
        .err()
        .context("no frames must fail")?
        .to_string();
    ensure!(err.contains("no frames"), "{err}");
    let err = load_rgb(dir().join("does_not_exist.png"))
        .err()
        .context("missing file must fail")?
        .to_string();
    ensure!(err.contains("does_not_exist.png"), "{err}");
    Ok(())
}
