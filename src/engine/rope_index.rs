//! M-RoPE position ids (`get_rope_index` of the reference, in its original form).
//!
//! Text tokens share one position in all three rows (t, h, w). A media block that starts after
//! `st` (1 + the largest position so far) gets t = frame-pair index, h/w = merged grid row/column,
//! each plus `st`; the text after it continues at `st + max(t, h/merge, w/merge)`. This is the rule
//! the model was trained with (transformers 4.x, vLLM), not transformers 5.x's `max(h, w)/merge`.

/// Grid of one media item in 14-px patches: temporal (frame pairs), height, width.
pub type GridThw = [usize; 3];

/// Position ids for a whole prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopePositions {
    /// Three rows (t, h, w), one entry per input token.
    pub rows: [Vec<i64>; 3],
    /// `max position + 1 - sequence length`: added to the cache length while decoding.
    pub delta: i64,
}

impl RopePositions {
    pub fn len(&self) -> usize {
        self.rows[0].len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows[0].is_empty()
    }
}

/// Which token ids mark media in the prompt.
#[derive(Debug, Clone, Copy)]
pub struct MediaTokens {
    pub image: u32,
    pub video: u32,
}

/// Errors in the relation between the prompt's pad tokens and the media grids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RopeIndexError {
    #[error(
        "the prompt has {found} {kind} pad tokens for {kind} #{index}, but its grid {grid:?} needs {expected}"
    )]
    PadCount {
        kind: &'static str,
        index: usize,
        grid: GridThw,
        expected: usize,
        found: usize,
    },
    #[error("the prompt has more {kind} blocks than {kind} inputs ({given} given)")]
    TooFewMedia { kind: &'static str, given: usize },
    #[error("{given} {kind} inputs were given but the prompt has only {used} {kind} blocks")]
    UnusedMedia {
        kind: &'static str,
        given: usize,
        used: usize,
    },
}

/// Computes the three position rows for `input_ids`, where each run of image (video) pad tokens
/// is one image (video) whose grid is the next entry of `image_grids` (`video_grids`).
pub fn rope_positions(
    input_ids: &[u32],
    tokens: MediaTokens,
    image_grids: &[GridThw],
    video_grids: &[GridThw],
    merge_size: usize,
) -> Result<RopePositions, RopeIndexError> {
    let n = input_ids.len();
    let mut rows: [Vec<i64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let (mut image_index, mut video_index) = (0usize, 0usize);
    let mut next_pos: i64 = 0; // 1 + largest position assigned so far
    let mut i = 0usize;
    while i < n {
        let id = input_ids[i];
        // A kind of pad with no media given is plain text, as in the reference.
        let (kind, grid, index) = if id == tokens.image && !image_grids.is_empty() {
            let grid = *image_grids
                .get(image_index)
                .ok_or(RopeIndexError::TooFewMedia {
                    kind: "image",
                    given: image_grids.len(),
                })?;
            image_index += 1;
            ("image", grid, image_index - 1)
        } else if id == tokens.video && !video_grids.is_empty() {
            let grid = *video_grids
                .get(video_index)
                .ok_or(RopeIndexError::TooFewMedia {
                    kind: "video",
                    given: video_grids.len(),
                })?;
            video_index += 1;
            ("video", grid, video_index - 1)
        } else {
            for row in rows.iter_mut() {
                row.push(next_pos);
            }
            next_pos += 1;
            i += 1;
            continue;
        };
        let [t, h, w] = grid;
        let (gh, gw) = (h / merge_size, w / merge_size);
        let expected = t * gh * gw;
        let found = input_ids[i..].iter().take_while(|&&x| x == id).count();
        if found != expected {
            return Err(RopeIndexError::PadCount {
                kind,
                index,
                grid,
                expected,
                found,
            });
        }
        let st = next_pos;
        for ti in 0..t {
            for hi in 0..gh {
                for wi in 0..gw {
                    rows[0].push(st + ti as i64);
                    rows[1].push(st + hi as i64);
                    rows[2].push(st + wi as i64);
                }
            }
        }
        next_pos = st + t.max(gh).max(gw) as i64;
        i += expected;
    }
    if image_index != image_grids.len() {
        return Err(RopeIndexError::UnusedMedia {
            kind: "image",
            given: image_grids.len(),
            used: image_index,
        });
    }
    if video_index != video_grids.len() {
        return Err(RopeIndexError::UnusedMedia {
            kind: "video",
            given: video_grids.len(),
            used: video_index,
        });
    }
    let delta = next_pos - n as i64;
    Ok(RopePositions { rows, delta })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: MediaTokens = MediaTokens { image: 9, video: 8 };

    #[test]
    fn text_only_counts_up_with_zero_delta() {
        let p = rope_positions(&[1, 2, 3], T, &[], &[], 2).unwrap();
        assert_eq!(p.rows[0], vec![0, 1, 2]);
        assert_eq!(p.rows, [vec![0, 1, 2], vec![0, 1, 2], vec![0, 1, 2]]);
        assert_eq!(p.delta, 0);
    }

    #[test]
    fn image_block_uses_grid_rows_and_columns() {
        // one image of grid 1x4x6 -> 2x3 merged tokens
        let mut ids = vec![1, 2];
        ids.extend([9; 6]);
        ids.push(3);
        let p = rope_positions(&ids, T, &[[1, 4, 6]], &[], 2).unwrap();
        assert_eq!(p.rows[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(p.rows[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(p.rows[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(p.delta, 6 - 9);
    }

    #[test]
    fn long_video_advances_by_its_temporal_length() {
        // 8 frames of 56x56: grid 4x4x4, merged 4x2x2 -> 16 tokens; text resumes at st + 4
        let mut ids = vec![1];
        ids.extend([8; 16]);
        ids.push(2);
        let p = rope_positions(&ids, T, &[], &[[4, 4, 4]], 2).unwrap();
        assert_eq!(*p.rows[0].last().unwrap(), 1 + 4);
        assert_eq!(p.rows[0][1..17].iter().max(), Some(&4));
    }

    #[test]
    fn wrong_pad_count_is_an_error() {
        let ids = vec![1, 9, 9, 9, 2];
        let err = rope_positions(&ids, T, &[[1, 4, 4]], &[], 2).unwrap_err();
        assert!(matches!(
            err,
            RopeIndexError::PadCount {
                expected: 4,
                found: 3,
                ..
            }
        ));
        let err = rope_positions(&[1, 2], T, &[[1, 2, 2]], &[], 2).unwrap_err();
        assert!(matches!(err, RopeIndexError::UnusedMedia { .. }));
        // pads typed as text with no media are ordinary tokens
        let p = rope_positions(&[1, 9, 8, 2], T, &[], &[], 2).unwrap();
        assert_eq!(p.rows[0], vec![0, 1, 2, 3]);
    }
}
