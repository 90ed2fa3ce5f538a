"""The web floor: request bodies, error rendering, bearer auth, the x402 HTTP binding and views."""
