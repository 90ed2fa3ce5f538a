"""`python -m agent_gateway` is the `agent-gateway` command."""

from agent_gateway.cli import main

raise SystemExit(main())
