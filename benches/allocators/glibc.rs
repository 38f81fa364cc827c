//! The Redis `GET` path through `Arc<dyn CacheService>` with glibc's malloc as the global
//! allocator (`std::alloc::System`, what a Rust binary on Linux uses unless it declares
//! another); see `benches/allocators/alloc_bench.rs` and `scripts/bench-allocators`.

#[path = "../../tests/support/mod.rs"]
mod support;

#[path = "../common/mod.rs"]
mod common;

#[path = "alloc_bench.rs"]
mod alloc_bench;

#[global_allocator]
static GLOBAL: std::alloc::System = std::alloc::System;

fn main() {
    alloc_bench::main("glibc");
}
