//! The paged KV cache: block pool with ref counts and prefix caching, and the cache storage.
