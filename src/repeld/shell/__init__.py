"""The trio shell: accept, hold, verdicts, hand-off and events, one phase per module."""
