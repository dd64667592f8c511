//! A slice's weights over the network. Both halves of the weight transfer live here, beside
//! the cache they fill, so one test drives the real server against the real fetcher and a
//! worker that holds a slice can serve it on; and a worker's own copy of the model
//! ([`local`]), read through the same server code once checked against the coordinator's.

pub mod fetch;
pub mod local;
pub mod serve;
pub mod slice_cache;

/// Bytes read at a time while hashing a tensor (the server hashing the GGUF, the cache
/// verifying what arrived): large enough that the read calls' overhead does not show.
const HASH_BUFFER_BYTES: usize = 1 << 20;
