"""Way in, SMTP: the aiosmtpd protocol and handler, the chunked DATA reader, per-client limits
and every reply text a client can see."""
