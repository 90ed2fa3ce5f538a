"""Anthropic Messages: the pure translation to and from OpenAI chat completions."""
