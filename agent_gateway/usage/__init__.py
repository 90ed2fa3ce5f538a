"""Usage: recording each proxied request and reporting it per key over time windows."""
