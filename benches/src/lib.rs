//! Benchmarks live under `benches/`; this library holds what they share.
