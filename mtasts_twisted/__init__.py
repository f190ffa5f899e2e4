"""
MTA-STS (RFC 8461) and SMTP TLS Reporting (RFC 8460) for Twisted mail.

The package is layered so data flows one way (see ``README.rst``):
``policy`` (pure parsing) → ``dns`` / ``fetch`` (discovery) → ``store`` /
``cache`` (policy cache) → ``tls`` / ``delivery`` → ``tlsrpt`` (reports).
"""

__version__ = "0.1.0"
