"""In-process servers and a fake OpenAI-compatible upstream for tests and benchmarks."""
