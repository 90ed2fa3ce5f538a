"""Money: USDC amounts, the x402 wire format, the chain adapter and the payment state machine."""
