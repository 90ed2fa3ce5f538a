"""The data plane: upstream client, leases, key directory, stream registry and metering."""
