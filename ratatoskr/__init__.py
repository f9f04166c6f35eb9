"""ratatoskr: an SMTP-to-HTTP-API mail relay that never loses an accepted message."""

__version__ = "0.1.0"
