"""The OpenAI-compatible /v1 face: admission in the contract's refusal order, and the relay."""
