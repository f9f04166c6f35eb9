"""Way in, HTTP: the JSON API (``POST /v1/messages``), its schema and OpenAPI document, turning a
request into MIME, plus the health and metrics routes."""
