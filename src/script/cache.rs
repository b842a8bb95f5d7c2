//! The answer cache of `vlad test`: what the model said for a step on a screen (a grounding box,
//! or an assertion's yes/no and box), keyed by the step's text and a fingerprint of the
//! screenshot, so a re-run replays without asking the model.
//!
//! A fingerprint is the screenshot's size, an exact hash (FNV-1a over the pixels) and a
//! 1024-bit difference hash (a 33x32 grey thumbnail, one bit per horizontal neighbour pair).
//! An entry matches when the sizes agree and either the exact hashes are equal or, with a
//! `tolerance` above 0, at most that many difference-hash bits differ (a blinking caret, not a
//! re-coloured window). The file is JSON, written atomically.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Entries kept per step text; the oldest go first.
const PER_STEP: usize = 8;
const VERSION: u32 = 1;

/// Why the cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "the test cache {} is damaged ({message}); delete it and run with a model to record it again",
        path.display()
    )]
    Damaged { path: PathBuf, message: String },
    #[error("cannot write the test cache {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What identifies a screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub width: u32,
    pub height: u32,
    pub exact: u64,
    pub dhash: [u64; 16],
}

impl Fingerprint {
    pub fn of(img: &RgbImage) -> Self {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut exact: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |b: u8| {
            exact ^= u64::from(b);
            exact = exact.wrapping_mul(0x0000_0100_0000_01b3);
        };
        for b in img
            .width()
            .to_le_bytes()
            .into_iter()
            .chain(img.height().to_le_bytes())
        {
            feed(b);
        }
        for &b in img.as_raw() {
            feed(b);
        }
        let grey = image::DynamicImage::ImageRgb8(img.clone()).to_luma8();
        let small = image::imageops::resize(&grey, 33, 32, image::imageops::FilterType::Triangle);
        let mut dhash = [0u64; 16];
        for y in 0..32u32 {
            for x in 0..32u32 {
                let bit = (y * 32 + x) as usize;
                if small.get_pixel(x, y).0[0] > small.get_pixel(x + 1, y).0[0] {
                    dhash[bit / 64] |= 1 << (bit % 64);
                }
            }
        }
        Self {
            width: img.width(),
            height: img.height(),
            exact,
            dhash,
        }
    }

    /// Difference-hash bits that differ.
    pub fn distance(&self, other: &Self) -> u32 {
        self.dhash
            .iter()
            .zip(&other.dhash)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum()
    }
}

/// What the model answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Answer {
    /// Where a thing is: its box and click point in screenshot pixels.
    Ground {
        label: Option<String>,
        bbox: [i32; 4],
        point: (i32, i32),
        reply: String,
    },
    /// Whether a thing is visible, and the box the model saw it in.
    Assert {
        visible: bool,
        bbox: Option<[i32; 4]>,
        reply: String,
    },
}

impl Answer {
    pub fn reply(&self) -> &str {
        match self {
            Self::Ground { reply, .. } | Self::Assert { reply, .. } => reply,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    step: String,
    width: u32,
    height: u32,
    /// Hex.
    exact: String,
    /// Hex, 256 digits.
    dhash: String,
    answer: Answer,
}

impl Entry {
    fn fingerprint(&self) -> Option<Fingerprint> {
        let exact = u64::from_str_radix(&self.exact, 16).ok()?;
        if self.dhash.len() != 256 {
            return None;
        }
        let mut dhash = [0u64; 16];
        for (i, word) in dhash.iter_mut().enumerate() {
            *word = u64::from_str_radix(self.dhash.get(i * 16..i * 16 + 16)?, 16).ok()?;
        }
        Some(Fingerprint {
            width: self.width,
            height: self.height,
            exact,
            dhash,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    entries: Vec<Entry>,
}

/// The result of a lookup.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Hit {
        answer: Answer,
        /// Difference-hash bits that differed (0 for an exact match).
        distance: u32,
    },
    /// Nothing recorded for this step yet.
    NotRecorded,
    /// Recorded, but for screens that differ from this one: the nearest by this many bits.
    ScreenChanged { nearest: u32 },
}

/// The cache of one test file.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    entries: Vec<(Entry, Fingerprint)>,
    dirty: bool,
}

impl Cache {
    /// Reads `path`; a file that does not exist is an empty cache.
    pub fn load(path: &Path) -> Result<Self, CacheError> {
        let damaged = |message: String| CacheError::Damaged {
            path: path.to_path_buf(),
            message,
        };
        let entries = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(damaged(e.to_string())),
            Ok(text) => {
                let file: File = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
                if file.version != VERSION {
                    return Err(damaged(format!(
                        "version {} (this vlad writes version {VERSION})",
                        file.version
                    )));
                }
                file.entries
                    .into_iter()
                    .map(|e| {
                        let fp = e.fingerprint().ok_or_else(|| {
                            damaged(format!("bad hash in the entry for {:?}", e.step))
                        })?;
                        Ok((e, fp))
                    })
                    .collect::<Result<Vec<_>, CacheError>>()?
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            entries,
            dirty: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded answer of `step` for a screen like `fp` (exact match first, then the
    /// nearest within `tolerance` bits).
    pub fn lookup(&self, step: &str, fp: &Fingerprint, tolerance: u32) -> Lookup {
        let mut nearest: Option<(u32, &Answer)> = None;
        let mut recorded = false;
        for (entry, efp) in &self.entries {
            if entry.step != step {
                continue;
            }
            recorded = true;
            if efp.width != fp.width || efp.height != fp.height {
                continue;
            }
            let d = if efp.exact == fp.exact {
                0
            } else {
                efp.distance(fp).max(1)
            };
            if nearest.is_none_or(|(best, _)| d < best) {
                nearest = Some((d, &entry.answer));
            }
        }
        match nearest {
            Some((d, answer)) if d == 0 || d <= tolerance => Lookup::Hit {
                answer: answer.clone(),
                distance: d,
            },
            Some((d, _)) => Lookup::ScreenChanged { nearest: d },
            None if recorded => Lookup::ScreenChanged { nearest: 1024 },
            None => Lookup::NotRecorded,
        }
    }

    /// Records `answer` for `step` on the screen `fp` (replacing one for the same exact screen).
    pub fn insert(&mut self, step: &str, fp: &Fingerprint, answer: Answer) {
        self.entries
            .retain(|(e, efp)| !(e.step == step && efp.exact == fp.exact && efp.width == fp.width));
        let same_step = self.entries.iter().filter(|(e, _)| e.step == step).count();
        if same_step >= PER_STEP
            && let Some(oldest) = self.entries.iter().position(|(e, _)| e.step == step)
        {
            self.entries.remove(oldest);
        }
        let entry = Entry {
            step: step.to_string(),
            width: fp.width,
            height: fp.height,
            exact: format!("{:016x}", fp.exact),
            dhash: fp.dhash.iter().map(|w| format!("{w:016x}")).collect(),
            answer,
        };
        self.entries.push((entry, fp.clone()));
        self.dirty = true;
    }

    /// Writes the file when something was recorded.
    pub fn save(&mut self) -> Result<(), CacheError> {
        if !self.dirty {
            return Ok(());
        }
        let err = |source| CacheError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let file = File {
            version: VERSION,
            entries: self.entries.iter().map(|(e, _)| e.clone()).collect(),
        };
        let mut json =
            serde_json::to_string_pretty(&file).map_err(|e| err(std::io::Error::other(e)))?;
        json.push('\n');
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn screen(button_x: u32) -> RgbImage {
        let mut img = RgbImage::from_pixel(320, 200, Rgb([230, 230, 230]));
        for y in 80..120 {
            for x in button_x..button_x + 80 {
                img.put_pixel(x, y, Rgb([40, 120, 200]));
            }
        }
        img
    }

    fn ground(x: i32) -> Answer {
        Answer::Ground {
            label: None,
            bbox: [x, 80, x + 80, 120],
            point: (x + 40, 100),
            reply: "r".into(),
        }
    }

    #[test]
    fn hits_survive_a_blinking_cursor_but_not_a_moved_button() -> Result<(), CacheError> {
        let dir = tempfile::tempdir().map_err(|source| CacheError::Write {
            path: PathBuf::new(),
            source,
        })?;
        let path = dir.path().join("c.json");
        let mut cache = Cache::load(&path)?;
        let base = screen(40);
        let fp = Fingerprint::of(&base);
        assert_eq!(cache.lookup("click OK", &fp, 24), Lookup::NotRecorded);
        cache.insert("click OK", &fp, ground(40));
        cache.save()?;

        let cache = Cache::load(&path)?;
        assert!(matches!(
            cache.lookup("click OK", &fp, 0),
            Lookup::Hit { distance: 0, .. }
        ));
        // A one-pixel-wide caret: not the same pixels, nearly the same screen.
        let mut caret = base.clone();
        for y in 150..165 {
            caret.put_pixel(200, y, Rgb([0, 0, 0]));
        }
        let fc = Fingerprint::of(&caret);
        assert_ne!(fc.exact, fp.exact);
        assert!(matches!(
            cache.lookup("click OK", &fc, 24),
            Lookup::Hit { .. }
        ));
        assert!(matches!(
            cache.lookup("click OK", &fc, 0),
            Lookup::ScreenChanged { .. }
        ));
        // The button moved: a different screen.
        let moved = Fingerprint::of(&screen(200));
        assert!(
            matches!(cache.lookup("click OK", &moved, 24), Lookup::ScreenChanged { nearest } if nearest > 24),
            "{:?}",
            cache.lookup("click OK", &moved, 24)
        );
        assert_eq!(cache.lookup("click Cancel", &fp, 24), Lookup::NotRecorded);
        Ok(())
    }

    #[test]
    fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let path = dir.path().join("c.json");
        let _ = std::fs::write(&path, "{not json");
        let e = Cache::load(&path).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("c.json") && e.contains("delete it")));
    }
}
