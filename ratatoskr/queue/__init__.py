"""The durable queue: every accepted message lives here until a provider has taken it."""
