//! Reused heap slots for the Redis backend's boxed futures (the `future-slots` feature, off by
//! default).
//!
//! Through `Arc<dyn CacheService>` every call returns a boxed future, and a Redis call's
//! future holds a fred command future of about 6.8 KB. Without this feature it is boxed with
//! `Box::pin`: one fresh ~7 KB allocation per call. With it, these futures live in 8 KB slots
//! that go back to a small per-thread free list when the future is dropped, and the box the
//! caller receives is a 32-byte handle.
//!
//! What it saves depends on the global allocator. `scripts/bench-allocators` measures a typed
//! `GET` through `Arc<dyn CacheService>` against a local redis-server, under glibc's malloc,
//! mimalloc and jemalloc, with and without the slots (client instructions and callgrind's
//! estimated cycles, which also charge cache misses; two runs, ratio slots on / off):
//!
//! | allocator | instructions, 64 tasks | 1 task    | est. cycles, 64 tasks | 1 task    |
//! |-----------|------------------------|-----------|-----------------------|-----------|
//! | glibc     | 0.912                  | 0.97-0.99 | 0.87-0.88             | 0.95-0.97 |
//! | mimalloc  | 0.957-0.958            | 0.97      | 0.89                  | 0.94      |
//! | jemalloc  | 0.957-0.967            | 0.96-0.97 | 0.92-0.94             | 0.94      |
//!
//! Wall-clock and CPU time on the shared 2-core machine moved by 10-30% from run to run and
//! showed no margin beyond that noise under mimalloc or jemalloc. Under mimalloc or jemalloc
//! the slots save under 5% of the instructions; and either allocator without the slots takes
//! 12-14% fewer instructions per `GET` than glibc without them, 3-6% fewer than glibc with
//! them (in estimated cycles, about the same as glibc with them). Hence the feature is off by
//! default, and the advice: with glibc's malloc, enable `future-slots` or make mimalloc or
//! jemalloc the application's global allocator (which speeds up the rest of the call too);
//! with mimalloc or jemalloc, leave it off. (The first measurement, before the feature, was
//! with glibc: about 20% of the client's CPU per `GET` with 64 tasks went to that
//! allocation, `benches/redis_ratios.rs` with `ALLOC_PROBE=1`.)
//!
//! At most [`POOL_CAP`] free slots are kept per thread (256 KB); beyond that a slot is freed.
//! A future larger than a slot, or aligned beyond it, is boxed the ordinary way (`Box::pin`).

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::mem::{MaybeUninit, align_of, size_of};
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::task::{Context, Poll};

use crate::service::BoxFuture;

/// Bytes in a slot: room for a fred command future and what the caller's `async` block adds.
pub(crate) const SLOT_BYTES: usize = 8 * 1024;
/// Free slots kept per thread.
pub(crate) const POOL_CAP: usize = 32;

#[repr(C, align(64))]
struct Slot(MaybeUninit<[u8; SLOT_BYTES]>);

thread_local! {
    static FREE: RefCell<Vec<Box<Slot>>> = const { RefCell::new(Vec::new()) };
}

fn take_slot() -> Box<Slot> {
    FREE.try_with(|free| free.try_borrow_mut().ok().and_then(|mut f| f.pop()))
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            // SAFETY: a `Slot` is a `MaybeUninit` byte array, valid uninitialised.
            unsafe { Box::<Slot>::new_uninit().assume_init() }
        })
}

fn give_back(slot: Box<Slot>) {
    // During thread teardown the list may be gone: the slot is then simply freed.
    let _ = FREE.try_with(move |free| {
        if let Ok(mut free) = free.try_borrow_mut() {
            if free.len() < POOL_CAP {
                free.push(slot);
            }
        }
    });
}

/// Free slots on this thread's list (for tests).
#[cfg(test)]
fn free_slots() -> usize {
    FREE.with(|free| free.borrow().len())
}

/// Whether a future of type `F` is stored in a slot rather than boxed on its own.
pub(crate) const fn fits<F>() -> bool {
    size_of::<F>() <= SLOT_BYTES && align_of::<F>() <= align_of::<Slot>()
}

/// Boxes the future `make` returns, in a reused slot when it fits (see the module docs).
/// `make` is called once the slot is at hand, so that the future can be built in place.
#[inline(always)]
pub(crate) fn boxed<'a, F>(make: impl FnOnce() -> F) -> BoxFuture<'a, F::Output>
where
    F: Future + Send + 'a,
{
    if !fits::<F>() {
        return Box::pin(make());
    }
    let slot = NonNull::from(Box::leak(take_slot())).cast::<F>();
    // SAFETY: the slot is `SLOT_BYTES` long and 64-aligned, which holds an `F` (checked by
    // `fits`), and nothing else refers to it. Should `make` panic, the slot leaks: safe.
    unsafe { slot.as_ptr().write(make()) };
    Box::pin(InSlot {
        slot: slot.cast(),
        poll: poll_in::<F>,
        drop_future: drop_in::<F>,
        _owns: PhantomData,
    })
}

/// # Safety
/// `slot` holds a live `F` that has not moved since it was written and is not dropped.
unsafe fn poll_in<F: Future>(slot: NonNull<Slot>, cx: &mut Context<'_>) -> Poll<F::Output> {
    // SAFETY: per the contract, and the `F` stays at this address until `drop_in`.
    unsafe { Pin::new_unchecked(&mut *slot.cast::<F>().as_ptr()) }.poll(cx)
}

/// # Safety
/// `slot` holds a live `F`; it is dead afterwards.
unsafe fn drop_in<F>(slot: NonNull<Slot>) {
    // SAFETY: per the contract.
    unsafe { ptr::drop_in_place(slot.cast::<F>().as_ptr()) }
}

/// The handle: owns a slot holding a pinned future whose type its two functions know.
struct InSlot<'a, T> {
    slot: NonNull<Slot>,
    poll: unsafe fn(NonNull<Slot>, &mut Context<'_>) -> Poll<T>,
    drop_future: unsafe fn(NonNull<Slot>),
    /// Carries the future's lifetime and output type.
    _owns: PhantomData<BoxFuture<'a, T>>,
}

// SAFETY: the slot holds an `F: Send` (required by `boxed`), owned by this handle alone, and
// the handle only touches it through `&mut self`. (A raw pointer is what makes it `!Send`.)
unsafe impl<T> Send for InSlot<'_, T> {}

impl<T> Future for InSlot<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // The handle is `Unpin`: moving it does not move the future, which is on the heap.
        let this = self.get_mut();
        // SAFETY: `slot` holds the live future written by `boxed`, never moved; it is
        // dropped only in `Drop`.
        unsafe { (this.poll)(this.slot, cx) }
    }
}

impl<T> Drop for InSlot<'_, T> {
    fn drop(&mut self) {
        /// Returns the slot even if the future's destructor panics.
        struct GiveBack(NonNull<Slot>);
        impl Drop for GiveBack {
            fn drop(&mut self) {
                // SAFETY: the pointer came from `Box::leak` in `boxed` and the future in it
                // has been dropped; no one else holds it.
                give_back(unsafe { Box::from_raw(self.0.as_ptr()) });
            }
        }
        let _give_back = GiveBack(self.slot);
        // SAFETY: the future is live (written by `boxed`, dropped only here, once).
        unsafe { (self.drop_future)(self.slot) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts drops of the values it is attached to.
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn runs_the_future_and_returns_its_output_and_the_slot() {
        let before = free_slots();
        let dropped = Arc::new(AtomicUsize::new(0));
        let tracked = Tracked(dropped.clone());
        let big = [7u8; 4096];
        let future = boxed(move || async move {
            tokio::task::yield_now().await;
            let _keep = &tracked;
            big.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
        assert_eq!(future.await, 7 * 4096);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "captured values dropped once"
        );
        // The slot came from the list (or was new when it was empty) and went back to it.
        assert_eq!(free_slots(), before.max(1));
    }

    #[test]
    fn a_future_dropped_unpolled_or_mid_way_drops_what_it_holds() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let tracked = Tracked(dropped.clone());
        drop(boxed(move || async move {
            let _keep = tracked;
        }));
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "never polled");

        let tracked = Tracked(dropped.clone());
        let mut future = boxed(move || async move {
            let _keep = tracked;
            std::future::pending::<()>().await;
        });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(future.as_mut().poll(&mut cx).is_pending());
        drop(future);
        assert_eq!(dropped.load(Ordering::SeqCst), 2, "cancelled after a poll");
    }

    #[test]
    fn too_large_or_overaligned_futures_are_boxed_on_their_own() {
        #[repr(align(128))]
        struct Aligned(#[allow(dead_code)] u8);
        assert!(fits::<[u8; SLOT_BYTES]>());
        assert!(!fits::<[u8; SLOT_BYTES + 1]>());
        assert!(!fits::<Aligned>());

        let before = free_slots();
        let big = [1u8; SLOT_BYTES + 64];
        let future = boxed(move || async move { big.len() });
        assert_eq!(
            futures_util::FutureExt::now_or_never(future),
            Some(SLOT_BYTES + 64)
        );
        assert_eq!(free_slots(), before, "no slot taken or returned");
    }

    #[test]
    fn the_free_list_is_bounded() {
        let futures: Vec<_> = (0..POOL_CAP * 2)
            .map(|i| boxed(move || async move { i }))
            .collect();
        drop(futures);
        assert_eq!(free_slots(), POOL_CAP);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn futures_move_between_threads_and_are_dropped_on_another() {
        let handles: Vec<_> = (0..64u64)
            .map(|i| {
                let future = boxed(move || async move {
                    tokio::task::yield_now().await;
                    i * 2
                });
                tokio::spawn(future)
            })
            .collect();
        let mut total = 0;
        for handle in handles {
            total += handle.await.unwrap();
        }
        assert_eq!(total, (0..64).map(|i| i * 2).sum::<u64>());
    }
}
