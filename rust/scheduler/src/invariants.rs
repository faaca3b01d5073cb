//! `check_invariants`: a full consistency check of the scheduler's bookkeeping, for tests and for
//! debugging from Python. It is O(everything), never called on the hot path.

use crate::error::{Result, SchedulerError};
use crate::queue::QueueKey;
use crate::request::{Request, Status};
use crate::schedule::Scheduler;
use crate::step_io::Buffer;

impl Scheduler {
    /// Returns `SchedulerError::Internal` naming the first broken invariant.
    pub fn check_invariants(&self) -> Result<()> {
        self.check_requests()
            .and_then(|()| self.check_last_step())
            .map_err(SchedulerError::Internal)
    }

    /// A running request's published pages are full and computed, and each one the cache still
    /// holds is what the cache names for the request's own prefix.
    fn check_published(&self, req: &Request) -> std::result::Result<(), String> {
        let id = req.id;
        let published = req.num_published as usize;
        let page_size = self.cfg.page_size;
        let Some(cache) = self.cache.as_ref().filter(|_| req.cache_prefix) else {
            return match published {
                0 => Ok(()),
                _ => Err(format!("request {id} published pages with no cache")),
            };
        };
        if published as u32 > req.num_computed / page_size || req.page_hashes.len() < published {
            return Err(format!("request {id} published pages it has not filled"));
        }
        for (i, &page) in req.pages[..published].iter().enumerate() {
            let (parent, tokens) = req.page_key(i, page_size);
            if cache.holds(page) && cache.find(parent, req.page_hashes[i], tokens) != Some(page) {
                return Err(format!(
                    "request {id}: cached page {page} at column {i} holds another prefix"
                ));
            }
        }
        Ok(())
    }

    fn check_requests(&self) -> std::result::Result<(), String> {
        let cfg = &self.cfg;
        let mut dense_owners = vec![0u32; cfg.num_dense_pages as usize];
        let mut stream_owners = vec![0u32; cfg.num_stream_pages.max(1) as usize];
        let mut row_owner = vec![None; cfg.max_num_seqs as usize];
        let (mut running, mut waiting, mut reserved) = (0, 0, 0);
        for (slot, req) in self.requests.iter() {
            let id = req.id;
            if req.num_computed > req.num_planned() || req.num_planned() > self.max_seq_len {
                return Err(format!("request {id}: bad token counts"));
            }
            let sampling = match req.status {
                Status::Waiting => 0,
                Status::Running => self.num_sampling(slot, id),
            };
            if req.num_in_flight != sampling {
                return Err(format!(
                    "request {id}: {} tokens in flight, but {sampling} steps in flight sample it",
                    req.num_in_flight
                ));
            }
            match req.status {
                Status::Waiting => {
                    waiting += 1;
                    if self.waiting.get(&QueueKey::of(req, cfg.scheduling_policy)) != Some(slot) {
                        return Err(format!("waiting request {id} is not queued under its key"));
                    }
                    if req.num_computed != 0
                        || !req.pages.is_empty()
                        || !req.stream_pages.is_empty()
                        || req.reserved_pages != 0
                        || req.num_published != 0
                    {
                        return Err(format!("waiting request {id} holds KV state"));
                    }
                }
                Status::Running => {
                    running += 1;
                    let listed_decoding = self.decoding.get(req.decode_idx as usize) == Some(&slot);
                    let listed_prefilling = self.prefilling.contains(&slot);
                    if listed_decoding == listed_prefilling {
                        return Err(format!("running request {id} is not listed exactly once"));
                    }
                    if listed_prefilling != (req.num_uncomputed() > 1) {
                        return Err(format!("running request {id} is in the wrong list"));
                    }
                    let owner = row_owner
                        .get_mut(req.row as usize)
                        .ok_or("row out of range")?;
                    if owner.replace(id).is_some() || self.free_rows.contains(&req.row) {
                        return Err(format!(
                            "row {} is not owned by request {id} alone",
                            req.row
                        ));
                    }
                    // Pages are allocated exactly up to the computed tokens; the reservation
                    // covers the rest of the prefill.
                    if req.pages.len() as u32 != cfg.pages_for(req.num_computed) {
                        return Err(format!(
                            "request {id}: page table does not match its tokens"
                        ));
                    }
                    let prefill_pages = cfg.pages_for(req.prefill_len);
                    if req.reserved_pages != prefill_pages.saturating_sub(req.pages.len() as u32) {
                        return Err(format!("request {id}: reservation is off"));
                    }
                    if req.stream_pages.len() as u32
                        != cfg.stream_table_len(req.max_len(self.max_seq_len))
                    {
                        return Err(format!("request {id}: streaming table has the wrong size"));
                    }
                    self.check_published(req)?;
                    reserved += req.reserved_pages;
                    for &page in &req.pages {
                        *dense_owners
                            .get_mut(page as usize)
                            .ok_or("dense page out of range")? += 1;
                    }
                    for &page in &req.stream_pages {
                        *stream_owners
                            .get_mut(page as usize)
                            .ok_or("stream page out of range")? += 1;
                    }
                }
            }
        }
        self.dense.check("dense", &dense_owners)?;
        if let Some(cache) = &self.cache {
            cache.check()?;
        }
        self.stream.check("stream", &stream_owners)?;
        if running != self.decoding.len() + self.prefilling.len() {
            return Err("running lists hold requests that are not running".into());
        }
        if running + self.free_rows.len() != cfg.max_num_seqs as usize {
            return Err(format!(
                "{running} running + {} free rows != max_num_seqs",
                self.free_rows.len()
            ));
        }
        if self.prefilling.len() > cfg.max_partial_prefills as usize {
            return Err(format!("{} partial prefills", self.prefilling.len()));
        }
        if reserved != self.reserved_pages || reserved > self.dense.num_free() {
            return Err(format!(
                "{} pages reserved (requests: {reserved}), {} free",
                self.reserved_pages,
                self.dense.num_free()
            ));
        }
        // Every waiting request is queued under its own key, so equal counts mean no stale entry.
        if waiting != self.waiting.len() {
            return Err(format!(
                "{waiting} waiting requests but {} queued",
                self.waiting.len()
            ));
        }
        Ok(())
    }

    fn check_last_step(&self) -> std::result::Result<(), String> {
        let io = &self.io;
        let n = io.req_ids().len();
        let num_tokens = io.qstart().last().copied().unwrap_or(0);
        if n > self.cfg.max_num_seqs as usize || num_tokens > self.cfg.max_num_batched_tokens as i32
        {
            return Err(format!(
                "last step: {n} requests, {num_tokens} tokens over the limits"
            ));
        }
        if io.input_ids().len() != num_tokens as usize
            || io.qstart().len() != n + 1
            || io
                .qstart()
                .windows(2)
                .zip(io.num_new())
                .any(|(w, &k)| w[1] - w[0] != k || k < 1)
        {
            return Err("last step: qstart, num_new and input_ids disagree".into());
        }
        let mut rows = io.rows().to_vec();
        rows.sort_unstable();
        if rows.windows(2).any(|w| w[0] == w[1]) {
            return Err("last step: a row is scheduled twice".into());
        }
        for &buf in Buffer::ALL {
            if io.data(buf).len() > buf.capacity(&self.cfg) {
                return Err(format!("last step: buffer {} overflows", buf.name()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{NewRequest, Scheduler, SchedulerConfig};

    /// A scheduler with one running request (3 dense pages) and one waiting.
    fn busy() -> Scheduler {
        let cfg = SchedulerConfig {
            page_size: 4,
            max_num_seqs: 1,
            ..SchedulerConfig::new(16, 64)
        };
        let mut s = Scheduler::new(cfg).unwrap();
        s.add_request(NewRequest::new(1, vec![1; 10], 8)).unwrap();
        s.add_request(NewRequest::new(2, vec![1; 10], 8)).unwrap();
        s.schedule().unwrap();
        s.check_invariants().unwrap();
        s
    }

    fn broken(s: &Scheduler) -> String {
        s.check_invariants().unwrap_err().to_string()
    }

    #[test]
    fn detects_a_leaked_page() {
        let mut s = busy();
        s.dense.alloc();
        assert!(broken(&s).contains("ref count"), "{}", broken(&s));
    }

    #[test]
    fn detects_a_double_owned_page() {
        let mut s = busy();
        let pages = &mut s.requests[s.decoding[0]].pages;
        pages[1] = pages[0];
        assert!(broken(&s).contains("but 2 owners"), "{}", broken(&s));
    }

    #[test]
    fn detects_row_and_reservation_errors() {
        let mut s = busy();
        s.free_rows.push(0);
        assert!(broken(&s).contains("row 0"), "{}", broken(&s));
        let mut s = busy();
        s.reserved_pages += 1;
        assert!(broken(&s).contains("reserved"), "{}", broken(&s));
    }

    #[test]
    fn detects_a_budget_overrun() {
        let mut s = busy();
        s.cfg.max_num_batched_tokens = 5;
        assert!(broken(&s).contains("over the limits"), "{}", broken(&s));
    }
}
