"""Delivery: claim due messages, walk the providers with failover and circuit breakers, and
apply each round's result to the queue (defer, bury, bounce, split)."""
