"""The /api routes: parse, call a service, render. Auth is decided once and declared per route."""
