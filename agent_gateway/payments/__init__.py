"""Payments: the x402 wire format, pure rules, the chain adapter and the payment state machine."""
