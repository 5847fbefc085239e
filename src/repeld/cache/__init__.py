"""The pass cache: its interface, the memory, SQLite and Redis backends, and the batched lookup."""
