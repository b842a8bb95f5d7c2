//! Vision-tower outputs of recent images and videos, by content hash: an agent shows the same
//! screenshot again (a history that drops older turns, a retried step, an unchanged screen), and
//! its embeddings need not be computed twice. Bounded by entry count; least recently used out.

use std::collections::VecDeque;

use candle_core::Tensor;

/// How many media outputs are kept (a 1920×1080 screenshot is ~16 MiB of f32 embeddings).
pub const CAPACITY: usize = 8;

#[derive(Default)]
pub struct VisionCache {
    /// Most recently used last.
    entries: VecDeque<(u64, Tensor)>,
}

impl VisionCache {
    /// The embeddings of the medium with content hash `hash`, marking them recently used.
    pub fn get(&mut self, hash: u64) -> Option<Tensor> {
        let at = self.entries.iter().position(|(h, _)| *h == hash)?;
        let entry = self.entries.remove(at)?;
        let tensor = entry.1.clone();
        self.entries.push_back(entry);
        Some(tensor)
    }

    pub fn insert(&mut self, hash: u64, embeddings: Tensor) {
        self.entries.retain(|(h, _)| *h != hash);
        self.entries.push_back((hash, embeddings));
        while self.entries.len() > CAPACITY {
            self.entries.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keeps_the_most_recently_used() {
        let mut cache = VisionCache::default();
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        for h in 0..CAPACITY as u64 {
            cache.insert(h, t(h as f32));
        }
        assert!(cache.get(0).is_some()); // 0 is now the most recent
        cache.insert(100, t(100.0));
        assert_eq!(cache.len(), CAPACITY);
        assert!(cache.get(1).is_none(), "the least recently used went out");
        assert_eq!(cache.get(0).unwrap().to_vec1::<f32>().unwrap(), vec![0.0]);
        cache.insert(0, t(5.0));
        assert_eq!(cache.get(0).unwrap().to_vec1::<f32>().unwrap(), vec![5.0]);
        assert_eq!(cache.len(), CAPACITY);
    }
}
