"""llamatron engine: model loading, scheduling, KV cache, sampling (never sees HTTP)."""
