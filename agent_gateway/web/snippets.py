"""Ready-to-run code that connects a client to this gateway with an `sk_` key: the OpenAI SDK,
the Anthropic SDK and curl, all pointed at AGW_PUBLIC_URL."""

from __future__ import annotations

from agent_gateway.services import Services

KEY_PLACEHOLDER = "sk_YOUR_KEY"


def connection_snippets(services: Services, api_key: str | None, model: str | None) -> dict[str, object]:
    """Base URLs and code for `api_key` (a placeholder without one) and `model` (the first model
    of the catalog without one)."""
    base = services.settings.external_url
    key = api_key or KEY_PLACEHOLDER
    if model is None:
        models = [m for pool in services.catalog.pools.values() for m in pool.models]
        model = models[0] if models else "MODEL"
    openai_url, anthropic_url = f"{base}/v1", f"{base}/anthropic"
    return {
        "baseUrls": {"openai": openai_url, "anthropic": anthropic_url},
        "model": model,
        "apiKey": key,
        "snippets": {
            "openaiPython": (
                "from openai import OpenAI\n\n"
                f"client = OpenAI(base_url={openai_url!r}, api_key={key!r})\n"
                f"reply = client.chat.completions.create(model={model!r}, "
                "messages=[{\"role\": \"user\", \"content\": \"Hello\"}])\n"
                "print(reply.choices[0].message.content)\n"
            ),
            "anthropicPython": (
                "from anthropic import Anthropic\n\n"
                f"client = Anthropic(base_url={anthropic_url!r}, api_key={key!r})\n"
                f"reply = client.messages.create(model={model!r}, max_tokens=256, "
                "messages=[{\"role\": \"user\", \"content\": \"Hello\"}])\n"
                "print(reply.content[0].text)\n"
            ),
            "curl": (
                f"curl {openai_url}/chat/completions -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n"
            ),
        },
        "notes": "One request in flight per key; requests outside the subscription's blocks get 429 with "
                 "Retry-After. GET /v1/usage shows the key's plan and usage.",
    }
