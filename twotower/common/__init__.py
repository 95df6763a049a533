"""Plumbing every stage shares (atomic writes, config-to-CLI, the encoder protocol, JSON Lines reading,
hashing, the cache dir, the device/precision policy, retrieval metrics). It imports no stage."""
