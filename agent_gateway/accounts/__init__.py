"""Accounts and their prepaid USDC balance."""
