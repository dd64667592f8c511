//! A slice's weights over the network. Both halves of the weight transfer live here, beside
//! the cache they fill, so one test drives the real server against the real fetcher and a
//! worker that holds a slice can serve it on.

pub mod fetch;
pub mod serve;
pub mod slice_cache;
