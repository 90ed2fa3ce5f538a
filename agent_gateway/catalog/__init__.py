"""Pools and blocks: the pools file, block arithmetic and prices."""
