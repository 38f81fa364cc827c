//! The Redis `GET` path through `Arc<dyn CacheService>` with mimalloc (crate `mimalloc`) as the
//! global allocator; see `benches/allocators/alloc_bench.rs` and `scripts/bench-allocators`.

#[path = "../../tests/support/mod.rs"]
mod support;

#[path = "../common/mod.rs"]
mod common;

#[path = "alloc_bench.rs"]
mod alloc_bench;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    alloc_bench::main("mimalloc");
}
