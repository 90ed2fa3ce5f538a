"""API and management keys: tokens, the key lifecycle, and revocation everywhere."""
