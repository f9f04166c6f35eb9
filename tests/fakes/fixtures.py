"""pytest fixtures that start the fake provider servers on loopback ports."""
