//! The Redis `GET` path through `Arc<dyn CacheService>` with jemalloc (crate
//! `tikv-jemallocator`) as the global allocator; see `benches/allocators/alloc_bench.rs` and
//! `scripts/bench-allocators`.

#[path = "../../tests/support/mod.rs"]
mod support;

#[path = "../common/mod.rs"]
mod common;

#[path = "alloc_bench.rs"]
mod alloc_bench;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    alloc_bench::main("jemalloc");
}
