"""Dashboard usage page: requests and tokens per key over 24 hours, 7 and 30 days, with bar charts."""

from __future__ import annotations

from starlette.responses import Response

from agent_gateway.dashboard.charts import bar_chart
from agent_gateway.dashboard.guard import Visit, page
from agent_gateway.keys import api_keys
from agent_gateway.usage.report import UsageBucket, bucket_starts, empty_totals, usage_by_key, usage_series

# Window -> (bucket size, bucket count, label format) for its charts.
CHART_WINDOWS = {"24h": ("hour", 24, "%H:00"), "7d": ("day", 7, "%a %d"), "30d": ("day", 30, "%b %d")}
WINDOW_NAMES = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days"}
TABLE_WINDOWS = ("24h", "7d", "30d")


@page()
async def usage(visit: Visit) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    window = visit.request.query_params.get("window", "7d")
    if window not in CHART_WINDOWS:
        window = "7d"
    bucket, count, label_format = CHART_WINDOWS[window]
    now = services.clock.now()
    views = await api_keys.list_keys(services.db, account.id)
    totals = await usage_by_key(services.db, now, account_id=account.id)
    series = await usage_series(services.db, now, account_id=account.id, bucket=bucket, count=count)
    starts = bucket_starts(now, bucket, count)
    labels = [start.strftime(label_format) for start in starts]

    def summed(key_ids: list[str]) -> list[UsageBucket]:
        buckets = [series[k] for k in key_ids if k in series]
        return [
            UsageBucket(start, sum(b[i].requests for b in buckets), sum(b[i].prompt_tokens for b in buckets),
                        sum(b[i].completion_tokens for b in buckets))
            for i, start in enumerate(starts)
        ]

    def row(name: str, detail: str, key_ids: list[str]) -> dict:
        per_window = {w: _sum_totals([totals[k][w] for k in key_ids if k in totals]) for w in TABLE_WINDOWS}
        spark = summed(key_ids)
        return {
            "name": name, "detail": detail, "totals": per_window,
            "spark": bar_chart([b.requests for b in spark], labels, width=150, height=30, axes=False),
        }

    rows = [row(v.key.name, f"{v.key.prefix}…{v.key.last_four} · {v.subscription.pool_slug}", [v.key.id])
            for v in views]
    deleted = sorted(set(totals) - {v.key.id for v in views})
    if deleted:
        rows.append(row("Deleted keys", f"{len(deleted)} key(s), kept for history", deleted))
    overall = summed(sorted(set(series)))
    return visit.render(
        "usage.html", title="Usage", nav="usage", window=window, windows=WINDOW_NAMES,
        table_windows=TABLE_WINDOWS, rows=rows, bucket=bucket,
        requests_chart=bar_chart([b.requests for b in overall], labels),
        tokens_chart=bar_chart([b.tokens for b in overall], labels),
        summary=_sum_totals([r["totals"][window] for r in rows]),
    )


def _sum_totals(items: list[dict[str, int]]) -> dict[str, int]:
    total = empty_totals()
    for item in items:
        for field, value in item.items():
            total[field] = total.get(field, 0) + value
    total["tokens"] = total["promptTokens"] + total["completionTokens"]
    return total
