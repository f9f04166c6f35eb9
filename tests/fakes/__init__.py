"""Fake provider servers: aiohttp apps that behave like the real APIs (see docs/providers/)."""
