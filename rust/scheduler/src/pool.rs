//! A pool of fixed-size KV pages: reference counts and a free list. Page 0 is the null page
//! (what unused page-table entries point at), so it is never handed out.
//!
//! The free list is ordered for the prefix cache: a page whose contents nothing will read again
//! goes to the front and is reused first (most recently freed first, which keeps page ids small
//! in tests and logs); a page the prefix cache keeps goes to the back, so the front is always
//! either uncached or the least recently released cached page (LRU eviction).

pub type PageId = u32;

pub const NULL_PAGE: PageId = 0;

#[derive(Debug)]
pub struct PagePool {
    ref_cnt: Vec<u32>,
    /// The free list, doubly linked through the pages themselves with the null page as its
    /// sentinel: `next[NULL_PAGE]` is the front, `prev[NULL_PAGE]` the back. Entries of pages
    /// in use are stale.
    next: Vec<PageId>,
    prev: Vec<PageId>,
    num_free: u32,
}

impl PagePool {
    /// A pool of `num_pages` pages including the null page (0 pages: a disabled pool).
    pub fn new(num_pages: u32) -> Self {
        let len = num_pages.max(1) as usize;
        let mut pool = Self {
            ref_cnt: vec![0; len],
            next: vec![NULL_PAGE; len],
            prev: vec![NULL_PAGE; len],
            num_free: 0,
        };
        // Page 1 is handed out first.
        for page in 1..num_pages {
            pool.push_back(page);
        }
        pool
    }

    /// Pages that can ever be handed out (the null page excluded).
    pub fn capacity(&self) -> u32 {
        self.ref_cnt.len() as u32 - 1
    }

    pub fn num_free(&self) -> u32 {
        self.num_free
    }

    pub fn num_used(&self) -> u32 {
        self.capacity() - self.num_free()
    }

    pub fn ref_count(&self, page: PageId) -> u32 {
        self.ref_cnt[page as usize]
    }

    /// Takes the front free page with one reference, or `None` if the pool is exhausted. The
    /// caller drops whatever the prefix cache knew of it.
    pub fn alloc(&mut self) -> Option<PageId> {
        let page = self.next[NULL_PAGE as usize];
        if page == NULL_PAGE {
            return None;
        }
        self.unlink(page);
        self.ref_cnt[page as usize] = 1;
        Some(page)
    }

    /// Adds a reference to a page that may be free (a prefix-cache hit): a free page leaves the
    /// free list with its contents.
    pub fn acquire(&mut self, page: PageId) {
        assert!(page != NULL_PAGE, "acquire of the null page");
        if self.ref_cnt[page as usize] == 0 {
            self.unlink(page);
        }
        self.ref_cnt[page as usize] += 1;
    }

    /// Drops one reference. A page left with none is free: at the back of the free list when
    /// its contents are `kept` (cached), else at the front.
    pub fn release(&mut self, page: PageId, kept: bool) {
        let cnt = &mut self.ref_cnt[page as usize];
        assert!(
            page != NULL_PAGE && *cnt > 0,
            "release of unowned page {page}"
        );
        *cnt -= 1;
        if *cnt > 0 {
            return;
        }
        if kept {
            self.push_back(page);
        } else {
            self.push_front(page);
        }
    }

    fn link(&mut self, page: PageId, prev: PageId, next: PageId) {
        self.prev[page as usize] = prev;
        self.next[page as usize] = next;
        self.next[prev as usize] = page;
        self.prev[next as usize] = page;
        self.num_free += 1;
    }

    fn push_front(&mut self, page: PageId) {
        self.link(page, NULL_PAGE, self.next[NULL_PAGE as usize]);
    }

    fn push_back(&mut self, page: PageId) {
        self.link(page, self.prev[NULL_PAGE as usize], NULL_PAGE);
    }

    fn unlink(&mut self, page: PageId) {
        let (prev, next) = (self.prev[page as usize], self.next[page as usize]);
        self.next[prev as usize] = next;
        self.prev[next as usize] = prev;
        self.num_free -= 1;
    }

    /// The free pages, front (reused first) to back.
    pub fn free_pages(&self) -> impl Iterator<Item = PageId> + '_ {
        let mut page = NULL_PAGE;
        std::iter::from_fn(move || {
            page = self.next[page as usize];
            (page != NULL_PAGE).then_some(page)
        })
        .take(self.ref_cnt.len())
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
        let mut prev = NULL_PAGE;
        let mut listed = 0;
        for page in self.free_pages() {
            if self.prev[page as usize] != prev {
                return Err(format!("{name} pool: free list broken at page {page}"));
            }
            if std::mem::replace(&mut on_free_list[page as usize], true) {
                return Err(format!(
                    "{name} pool: page {page} is on the free list twice"
                ));
            }
            if self.ref_cnt[page as usize] != 0 {
                return Err(format!(
                    "{name} pool: page {page} is both free and referenced"
                ));
            }
            prev = page;
            listed += 1;
        }
        if listed != self.num_free || self.prev[NULL_PAGE as usize] != prev {
            return Err(format!(
                "{name} pool: {listed} pages listed free, {} counted",
                self.num_free
            ));
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
        pool.release(2, false);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.alloc(), Some(2));
    }

    #[test]
    fn kept_pages_are_reused_last_and_in_release_order() {
        let mut pool = PagePool::new(5);
        let pages: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        pool.release(pages[0], true);
        pool.release(pages[1], false);
        pool.release(pages[2], true);
        pool.release(pages[3], false);
        assert_eq!(pool.free_pages().collect::<Vec<_>>(), [4, 2, 1, 3]);
        pool.check("dense", &[0; 5]).unwrap();
        // A hit takes a kept page out of the middle of the list.
        pool.acquire(1);
        pool.acquire(1);
        assert_eq!(pool.ref_count(1), 2);
        assert_eq!(pool.free_pages().collect::<Vec<_>>(), [4, 2, 3]);
        pool.check("dense", &[0, 2, 0, 0, 0]).unwrap();
        assert_eq!(
            (pool.alloc(), pool.alloc(), pool.alloc()),
            (Some(4), Some(2), Some(3))
        );
        assert_eq!(pool.alloc(), None);
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
        pool.push_back(page);
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
        pool.release(page, false);
        pool.release(page, false);
    }
}
