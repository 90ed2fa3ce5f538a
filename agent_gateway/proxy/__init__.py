"""The data plane: upstream client, leases, revocation, streaming relay and usage."""
