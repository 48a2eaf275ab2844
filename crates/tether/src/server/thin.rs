//! A client id as the server keeps it: one block per id, shared by the presence registry,
//! the client table and the connection's sink, reached through a thin pointer (issue 17,
//! target 1).
//!
//! `Arc<str>` is a 16-byte pointer (address and length) to a block with 16 bytes of counts
//! (strong and weak) before the bytes: an id of 9 to 24 bytes is a 48-byte glibc chunk, and
//! each of its three references (the registry's key, the client table's key, the sink's
//! copy) costs 16 bytes in its table. A [`ThinId`] is an 8-byte pointer to a block with one
//! 4-byte count and the 4-byte length before the bytes: an id of up to 16 bytes is a
//! 32-byte chunk (17 to 32 bytes: 48), and a reference costs 8 bytes.
//!
//! ```text
//!  ThinId ──▶ ┌───────────┬──────────┬────────────────────┐
//!             │ count u32 │ len u32  │ the id's UTF-8 ... │
//!             └───────────┴──────────┴────────────────────┘
//! ```
//!
//! No weak count (nothing needs one) and no mutation: the bytes are written once, before
//! the pointer is shared. Hand-written because the 8-byte header is the point: the thin
//! shared strings of the crates at hand keep 16 bytes before the bytes — `arcstr::ArcStr`
//! (already in the dependency tree) a `usize` length-and-flag and a `usize` count,
//! `triomphe::ThinArc<(), u8>` (and `servo_arc`'s, its origin) a `usize` count and a `usize`
//! length — so a 12-byte id is a 48-byte chunk with them too, as with `Arc<str>`; only the
//! pointer would be thinner. Its `unsafe` is the allocation, the count and the read of the
//! bytes, each with its argument below; the tests check the count through clones and drops
//! on several threads, and that hashing, ordering and equality are the `str`'s (what
//! lookups by `&str` through `Borrow<str>` rely on). Miri is not available here.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{fence, AtomicU32};

#[repr(C)]
struct Header {
    count: AtomicU32,
    len: u32,
}

/// A shared, immutable client id behind a thin pointer (see the module docs).
pub(crate) struct ThinId(NonNull<Header>);

// SAFETY: the bytes are immutable once shared and the count is atomic, as in `Arc<str>`.
unsafe impl Send for ThinId {}
// SAFETY: as above: `&ThinId` only reads.
unsafe impl Sync for ThinId {}

/// The block for `len` bytes of id.
fn layout(len: usize) -> Layout {
    // An id is at most `MAX_CLIENT_ID_LEN` bytes; `from` refuses what does not fit a u32.
    Layout::new::<Header>()
        .extend(Layout::array::<u8>(len).expect("an id's length fits a layout"))
        .expect("an id's length fits a layout")
        .0
        .pad_to_align()
}

impl From<&str> for ThinId {
    fn from(id: &str) -> Self {
        let len = u32::try_from(id.len()).expect("a client id is shorter than 4 GiB");
        let layout = layout(id.len());
        // SAFETY: the layout is not zero-sized (the header alone is 8 bytes).
        let p = unsafe { alloc(layout) }.cast::<Header>();
        let Some(p) = NonNull::new(p) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `p` is a fresh block of `layout`: the header, then `len` bytes, written
        // here before anything else sees the pointer.
        unsafe {
            p.write(Header {
                count: AtomicU32::new(1),
                len,
            });
            std::ptr::copy_nonoverlapping(id.as_ptr(), p.as_ptr().add(1).cast::<u8>(), id.len());
        }
        ThinId(p)
    }
}

impl ThinId {
    /// The id.
    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: the block lives while `self` holds a count; its `len` bytes after the
        // header were copied from a `str` and never change.
        unsafe {
            let h = self.0.as_ptr();
            let bytes = std::slice::from_raw_parts(h.add(1).cast::<u8>(), (*h).len as usize);
            std::str::from_utf8_unchecked(bytes)
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the block lives while `self` holds a count.
        unsafe { self.0.as_ref() }
    }
}

impl Clone for ThinId {
    fn clone(&self) -> Self {
        // Relaxed, as `Arc::clone`: a new reference comes from an existing one.
        let old = self.header().count.fetch_add(1, Relaxed);
        if old > u32::MAX / 2 {
            // Two billion references to one id (as `Arc` does at `isize::MAX`): a leak of
            // references, never a count that wraps and frees a block in use.
            std::process::abort();
        }
        ThinId(self.0)
    }
}

impl Drop for ThinId {
    fn drop(&mut self) {
        if self.header().count.fetch_sub(1, Release) != 1 {
            return;
        }
        // The last reference: every other's use happened before (as `Arc`'s drop).
        fence(Acquire);
        let len = self.header().len as usize;
        // SAFETY: the last reference; the block was allocated with this layout.
        unsafe { dealloc(self.0.as_ptr().cast::<u8>(), layout(len)) }
    }
}

impl std::ops::Deref for ThinId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ThinId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ThinId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ThinId {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 || self.as_str() == other.as_str()
    }
}

impl Eq for ThinId {}

impl PartialOrd for ThinId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ThinId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for ThinId {
    /// As the `str` (what `Borrow<str>` lookups hash).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl std::fmt::Display for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn a_thin_id_is_its_str_shared_and_freed_with_its_last_reference() {
        assert_eq!(std::mem::size_of::<ThinId>(), 8);
        assert_eq!(std::mem::size_of::<Option<ThinId>>(), 8);
        for id in ["", "a", "client-00001", &"é".repeat(127), &"x".repeat(255)] {
            let t = ThinId::from(id);
            assert_eq!(t.as_str(), id);
            assert_eq!(layout(id.len()).size(), (8 + id.len()).next_multiple_of(4));
            let copies: Vec<ThinId> = (0..100).map(|_| t.clone()).collect();
            assert_eq!(t.header().count.load(Relaxed), 101);
            assert!(copies.iter().all(|c| c.0 == t.0 && &**c == id));
            let sent =
                std::thread::spawn(move || copies.into_iter().map(|c| c.len()).sum::<usize>());
            assert_eq!(sent.join().expect("the thread"), 100 * id.len());
            assert_eq!(t.header().count.load(Relaxed), 1);
        }
        // As a key, looked up by `str`: the same hash, order and equality as the `str`.
        let mut h = HashMap::new();
        let mut b = BTreeMap::new();
        for i in (0..50).rev() {
            let t = ThinId::from(format!("client-{i:05}").as_str());
            h.insert(t.clone(), i);
            b.insert(t, i);
        }
        assert_eq!(h.get("client-00007"), Some(&7));
        assert_eq!(b.get("client-00049"), Some(&49));
        assert_eq!(h.get("client-7"), None);
        let order: Vec<i32> = b.values().copied().collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
        assert_eq!(ThinId::from("abc"), ThinId::from("abc"));
        assert!(ThinId::from("abc") < ThinId::from("abd"));
        assert_eq!(
            format!("{:?} {}", ThinId::from("x\"y"), ThinId::from("z")),
            "\"x\\\"y\" z"
        );
    }

    /// Clones and drops racing on several threads leave the count exact (it would free the
    /// block early, or never, if an update were lost).
    #[test]
    fn clones_and_drops_on_several_threads_keep_the_count() {
        let t = ThinId::from("client-00001");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        let a = t.clone();
                        let b = a.clone();
                        assert_eq!(&*b, "client-00001");
                        drop(a);
                        drop(b);
                    }
                });
            }
        });
        assert_eq!(t.header().count.load(Relaxed), 1);
        // Held by other threads past this one's drop: the block lives for them.
        let held: Vec<ThinId> = (0..4).map(|_| t.clone()).collect();
        drop(t);
        let ends: Vec<_> = held
            .into_iter()
            .map(|c| std::thread::spawn(move || c.as_str().to_owned()))
            .collect();
        for e in ends {
            assert_eq!(e.join().expect("the thread"), "client-00001");
        }
    }

    /// Send and Sync, as a key shared across the server's threads.
    #[test]
    fn a_thin_id_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<ThinId>();
    }
}
