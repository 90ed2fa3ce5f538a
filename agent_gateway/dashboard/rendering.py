"""Dashboard HTML: the Jinja2 environment, display filters and the headers every page carries."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from agent_gateway.clock import as_utc
from agent_gateway.money import format_usdc
from agent_gateway.payments.checks import format_eth

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

# Everything the pages use is served by the gateway itself: no CDN, no font host, no fetches.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # Same-origin referers keep the forgery check's fallback working without leaking paths elsewhere.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def when(value: datetime | None, missing: str = "never") -> str:
    if value is None:
        return missing
    return as_utc(value).strftime("%Y-%m-%d %H:%M UTC")


def day(value: datetime | None) -> str:
    return "—" if value is None else as_utc(value).strftime("%b %d, %Y")


def number(value: int) -> str:
    return f"{value:,}"


def compact(value: int) -> str:
    """12, 1.2k, 34k, 1.2M: short enough for chart labels."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f}{suffix}".replace(".0", "") if scaled < 10 else f"{scaled:.0f}{suffix}"
    return str(value)


def short_id(value: str) -> str:
    """`sub_3f2a…9c1d`: enough to tell rows apart, the full id stays in the title attribute."""
    prefix, _, rest = value.partition("_")
    return value if len(rest) <= 8 else f"{prefix}_{rest[:4]}…{rest[-4:]}"


def _asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


class PageRenderer:
    """Renders templates into responses; the one place dashboard HTML is produced."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES_DIR),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(when=when, day=day, usdc=format_usdc, eth=format_eth, number=number,
                                compact=compact, short_id=short_id)
        self.env.globals["asset_version"] = _asset_version()

    def render(self, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        html = self.env.get_template(template).render(**context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
