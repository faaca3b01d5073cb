//! The prefix cache: full dense pages found again by their contents, as vLLM v1 does it.
//!
//! A full page is named by a hash chain: `hash(parent, tokens)`, where `parent` is the hash of
//! the page before it (`ROOT` for the first), so a name stands for the whole prefix up to the
//! page's end. A request publishes each page once its KV is computed; a later request whose
//! prompt starts with the same pages takes references to them instead of recomputing. The hash
//! only finds a candidate: a hit also needs the page's parent hash and its own tokens to match,
//! so a collision in the chain's 64 bits would need equal tokens too.
//!
//! A published page outlives its requests: with no reference left it waits at the back of the
//! pool's free list and is forgotten only when the pool hands it out again (`forget`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::pool::{PageId, NULL_PAGE};

/// The parent hash of a request's first page.
pub const ROOT: u64 = 0;

/// The chain hash of a page holding `tokens` after the prefix named `parent`.
pub fn chain_hash(parent: u64, tokens: &[i32]) -> u64 {
    // SipHash with fixed keys: the same names in every process and run.
    let mut hasher = std::hash::DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug)]
struct Block {
    hash: u64,
    parent: u64,
    tokens: Box<[i32]>,
}

#[derive(Debug)]
pub struct PrefixCache {
    by_hash: HashMap<u64, PageId>,
    /// What each published page holds, by page id.
    blocks: Vec<Option<Block>>,
}

impl PrefixCache {
    pub fn new(num_pages: u32) -> Self {
        Self {
            by_hash: HashMap::new(),
            blocks: (0..num_pages.max(1)).map(|_| None).collect(),
        }
    }

    /// Pages published and not yet reused.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn holds(&self, page: PageId) -> bool {
        self.blocks[page as usize].is_some()
    }

    /// The page holding `tokens` after the prefix `parent`, named `hash`, if published.
    pub fn find(&self, parent: u64, hash: u64, tokens: &[i32]) -> Option<PageId> {
        let page = *self.by_hash.get(&hash)?;
        let block = self.blocks[page as usize].as_ref()?;
        (block.parent == parent && *block.tokens == *tokens).then_some(page)
    }

    /// Publishes `page`, unless another page already holds the same prefix (two requests
    /// computed it at once): that one stays the cached copy and `page` is freed as usual.
    pub fn publish(&mut self, page: PageId, parent: u64, hash: u64, tokens: &[i32]) {
        debug_assert!(page != NULL_PAGE && !self.holds(page));
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_hash.entry(hash) {
            slot.insert(page);
            self.blocks[page as usize] = Some(Block {
                hash,
                parent,
                tokens: tokens.into(),
            });
        }
    }

    /// Drops what the cache knows of `page`, which is being reused for other contents.
    pub fn forget(&mut self, page: PageId) {
        if let Some(block) = self.blocks[page as usize].take() {
            self.by_hash.remove(&block.hash);
        }
    }

    /// Checks that the index and the blocks agree.
    pub fn check(&self) -> Result<(), String> {
        for (&hash, &page) in &self.by_hash {
            match self.blocks.get(page as usize) {
                Some(Some(block)) if block.hash == hash && page != NULL_PAGE => {}
                _ => {
                    return Err(format!(
                        "prefix cache: hash {hash:#x} names page {page} wrongly"
                    ))
                }
            }
        }
        let blocks = self.blocks.iter().flatten().count();
        if blocks != self.by_hash.len() {
            return Err(format!(
                "prefix cache: {blocks} blocks but {} hashes",
                self.by_hash.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_needs_the_same_parent_and_tokens() {
        let mut cache = PrefixCache::new(4);
        let first = chain_hash(ROOT, &[1, 2]);
        cache.publish(1, ROOT, first, &[1, 2]);
        assert_eq!(cache.find(ROOT, first, &[1, 2]), Some(1));
        assert_eq!(cache.find(ROOT, first, &[1, 3]), None, "tokens differ");
        assert_eq!(cache.find(7, first, &[1, 2]), None, "parent differs");
        assert_ne!(chain_hash(first, &[3, 4]), chain_hash(ROOT, &[3, 4]));
        cache.check().unwrap();
    }

    #[test]
    fn the_first_copy_stays_published_until_reused() {
        let mut cache = PrefixCache::new(4);
        let hash = chain_hash(ROOT, &[5]);
        cache.publish(2, ROOT, hash, &[5]);
        cache.publish(3, ROOT, hash, &[5]);
        assert_eq!((cache.len(), cache.holds(3)), (1, false));
        cache.forget(3);
        assert_eq!(cache.find(ROOT, hash, &[5]), Some(2));
        cache.forget(2);
        assert_eq!((cache.len(), cache.find(ROOT, hash, &[5])), (0, None));
        cache.check().unwrap();
    }
}
