"""Seats and subscriptions: the seat inventory, buying seats, listing and expiring subscriptions."""
