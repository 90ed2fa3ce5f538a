"""The MCP face: the gateway's agent tools at /mcp (official `mcp` SDK, Streamable HTTP), on the web floor."""
