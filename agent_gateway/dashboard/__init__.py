"""The web dashboard, served by the gateway at /dashboard: server-rendered pages, no external fetch."""

from agent_gateway.dashboard.app import create_dashboard

__all__ = ["create_dashboard"]
