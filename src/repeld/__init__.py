"""repeld: a spam-repellent greeting-delay daemon for SMTP servers."""

__version__ = "0.1.0"
