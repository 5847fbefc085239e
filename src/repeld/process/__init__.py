"""The process top: start-up in order, signals, and the --workers parent.

It sits above every other layer and may import any of them; nothing but
`repeld.cli` imports it, so `service/` below is primitives only (privileges,
pid file, socket activation, sd_notify, capacity, TCP tuning).
"""
