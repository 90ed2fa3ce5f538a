"""API and management keys: token generation, hashing and the key lifecycle."""
