//! Reuse of the KV cache across calls: an agent step appends a screenshot and a few tokens to a
//! conversation whose beginning is unchanged, so the next call only needs to run what is new.
//! [`CachedPrefix`] remembers which tokens (and which media, by content hash) the cache holds and
//! finds how much of a new prompt it already covers.

use std::hash::{BuildHasher, Hash, Hasher};

use super::image::PatchedMedia;

/// One media block of a prompt: where its pad tokens lie and what it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSpan {
    pub start: usize,
    pub len: usize,
    pub hash: u64,
}

/// Hash of a media item's patch values and grid (identical pixels → identical hash).
/// A 1080p screenshot is 50 MB of values: foldhash reads them 64 bytes per step (SipHash, one value
/// at a time, took ~50 ms there).
pub fn media_hash(media: &PatchedMedia) -> u64 {
    let mut h = foldhash::quality::FixedState::with_seed(MEDIA_HASH_SEED).build_hasher();
    media.grid_thw.hash(&mut h);
    h.write(bytemuck::cast_slice(&media.values));
    h.finish()
}

/// Any fixed value: hashes only need to agree within one process.
const MEDIA_HASH_SEED: u64 = 0x7661_6c64;

/// Locates the media blocks of `ids`: runs of `pad_ids`, paired in order with `hashes` (images
/// and videos are matched to their own pad id).
pub fn media_spans(
    ids: &[u32],
    image_pad: u32,
    video_pad: u32,
    images: &[u64],
    videos: &[u64],
) -> Vec<MediaSpan> {
    let mut spans = Vec::new();
    let (mut next_image, mut next_video) = (0, 0);
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let hash = if id == image_pad && next_image < images.len() {
            next_image += 1;
            Some(images[next_image - 1])
        } else if id == video_pad && next_video < videos.len() {
            next_video += 1;
            Some(videos[next_video - 1])
        } else {
            None
        };
        match hash {
            Some(hash) => {
                let len = ids[i..].iter().take_while(|&&x| x == id).count();
                spans.push(MediaSpan {
                    start: i,
                    len,
                    hash,
                });
                i += len;
            }
            None => i += 1,
        }
    }
    spans
}

/// What the KV cache currently holds.
#[derive(Debug, Clone, Default)]
pub struct CachedPrefix {
    pub ids: Vec<u32>,
    pub media: Vec<MediaSpan>,
}

impl CachedPrefix {
    /// How many leading tokens of a new prompt (`ids`, `media`) the cache already covers. Always
    /// leaves at least one token to run, so the call has logits; never ends inside a media block.
    pub fn reusable(&self, ids: &[u32], media: &[MediaSpan]) -> usize {
        let mut common = self
            .ids
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        for span in media {
            if span.start >= common {
                break;
            }
            let same = self.media.iter().any(|m| m == span);
            if !same || span.start + span.len > common {
                common = span.start;
                break;
            }
        }
        common
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, len: usize, hash: u64) -> MediaSpan {
        MediaSpan { start, len, hash }
    }

    #[test]
    fn finds_media_blocks_in_order() {
        let ids = [1, 9, 9, 2, 8, 8, 8, 3, 9];
        let spans = media_spans(&ids, 9, 8, &[11, 12], &[21]);
        assert_eq!(spans, vec![span(1, 2, 11), span(4, 3, 21), span(8, 1, 12)]);
    }

    #[test]
    fn reuses_the_common_prefix_but_not_a_changed_image() {
        let cached = CachedPrefix {
            ids: vec![1, 9, 9, 2, 3, 4],
            media: vec![span(1, 2, 11)],
        };
        // same image, longer conversation: everything cached is reused
        assert_eq!(
            cached.reusable(&[1, 9, 9, 2, 3, 4, 5, 6], &[span(1, 2, 11)]),
            6
        );
        // a different picture with the same size: reuse stops before it
        assert_eq!(
            cached.reusable(&[1, 9, 9, 2, 3, 4, 5], &[span(1, 2, 99)]),
            1
        );
        // the same prompt again: one token is left to run
        assert_eq!(cached.reusable(&[1, 9, 9, 2, 3, 4], &[span(1, 2, 11)]), 5);
        // diverging text
        assert_eq!(cached.reusable(&[1, 9, 9, 7], &[span(1, 2, 11)]), 3);
        assert_eq!(CachedPrefix::default().reusable(&[1, 2], &[]), 0);
    }
}
