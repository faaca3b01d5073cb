//! A pool of fixed-size KV pages: reference counts and a free list. Page 0 is the null page
//! (what unused page-table entries point at), so it is never handed out.

pub type PageId = u32;

pub const NULL_PAGE: PageId = 0;

#[derive(Debug)]
pub struct PagePool {
    ref_cnt: Vec<u32>,
    /// Free pages, used as a stack: the most recently freed page is reused first.
    free: Vec<PageId>,
}

impl PagePool {
    /// A pool of `num_pages` pages including the null page (0 pages: a disabled pool).
    pub fn new(num_pages: u32) -> Self {
        // Reversed so that page 1 is handed out first: tables read naturally in tests and logs.
        let free = (1..num_pages).rev().collect();
        Self {
            ref_cnt: vec![0; num_pages.max(1) as usize],
            free,
        }
    }

    /// Pages that can ever be handed out (the null page excluded).
    pub fn capacity(&self) -> u32 {
        self.ref_cnt.len() as u32 - 1
    }

    pub fn num_free(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn num_used(&self) -> u32 {
        self.capacity() - self.num_free()
    }

    /// Takes a free page with one reference, or `None` if the pool is exhausted.
    pub fn alloc(&mut self) -> Option<PageId> {
        let page = self.free.pop()?;
        self.ref_cnt[page as usize] = 1;
        Some(page)
    }

    /// Drops one reference; the page goes back to the free list when none is left.
    pub fn release(&mut self, page: PageId) {
        let cnt = &mut self.ref_cnt[page as usize];
        assert!(
            page != NULL_PAGE && *cnt > 0,
            "release of unowned page {page}"
        );
        *cnt -= 1;
        if *cnt == 0 {
            self.free.push(page);
        }
    }

    /// Checks the pool against `owned`, the number of table entries holding each page.
    pub fn check(&self, name: &str, owned: &[u32]) -> Result<(), String> {
        if self.ref_cnt[NULL_PAGE as usize] != 0 || owned[NULL_PAGE as usize] != 0 {
            return Err(format!("{name} pool: the null page is in use"));
        }
        if let Some(page) = self.ref_cnt.iter().zip(owned).position(|(r, o)| r != o) {
            return Err(format!(
                "{name} pool: page {page} has ref count {} but {} owners",
                self.ref_cnt[page], owned[page]
            ));
        }
        let mut on_free_list = vec![false; self.ref_cnt.len()];
        for &page in &self.free {
            let slot = on_free_list
                .get_mut(page as usize)
                .filter(|_| page != NULL_PAGE)
                .ok_or_else(|| format!("{name} pool: bad page {page} on the free list"))?;
            if std::mem::replace(slot, true) {
                return Err(format!(
                    "{name} pool: page {page} is on the free list twice"
                ));
            }
            if self.ref_cnt[page as usize] != 0 {
                return Err(format!(
                    "{name} pool: page {page} is both free and referenced"
                ));
            }
        }
        let referenced = self.ref_cnt.iter().filter(|&&c| c > 0).count() as u32;
        if referenced + self.num_free() != self.capacity() {
            return Err(format!(
                "{name} pool: {referenced} referenced + {} free != {} pages",
                self.num_free(),
                self.capacity()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_and_release_round_trip() {
        let mut pool = PagePool::new(4);
        assert_eq!(pool.capacity(), 3);
        let pages: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pages, [1, 2, 3]);
        assert_eq!(pool.alloc(), None, "the null page is never handed out");
        assert_eq!(pool.num_used(), 3);
        pool.check("dense", &[0, 1, 1, 1]).unwrap();
        pool.release(2);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.alloc(), Some(2));
    }

    #[test]
    fn disabled_pool_has_no_pages() {
        let mut pool = PagePool::new(0);
        assert_eq!((pool.capacity(), pool.alloc()), (0, None));
        pool.check("stream", &[0]).unwrap();
    }

    #[test]
    fn check_finds_mismatches() {
        let mut pool = PagePool::new(3);
        let page = pool.alloc().unwrap();
        assert!(pool
            .check("dense", &[0, 0, 0])
            .unwrap_err()
            .contains("ref count"));
        pool.free.push(page);
        assert!(pool
            .check("dense", &[0, 1, 0])
            .unwrap_err()
            .contains("both free and referenced"));
    }

    #[test]
    #[should_panic(expected = "unowned page")]
    fn double_release_panics() {
        let mut pool = PagePool::new(3);
        let page = pool.alloc().unwrap();
        pool.release(page);
        pool.release(page);
    }
}
