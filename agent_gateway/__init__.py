"""agent_gateway: sell seats on LLM inference pools to people and to AI agents paying over x402."""

__version__ = "0.1.0"
