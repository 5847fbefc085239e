"""`repeld report`: read repeld's events back from logs and show what the delay does.

Pure code but for main.py (files, stdin, stdout): parse.py turns a log line into a
`Record`, tally.py counts them, text.py and svg.py render the counts.
"""
