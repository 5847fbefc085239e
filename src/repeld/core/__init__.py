"""The sans-IO core: every decision, fed bytes, EOF and the time; no trio, no sockets."""
