"""Process primitives the daemon is built from: privileges, pid file, sd_notify, socket
activation, listeners, capacity limits and TCP tuning (the cffi module's typed wrapper).

Nothing here imports the shell: the process top (`repeld.process`) assembles these
primitives and the shell into a running daemon.
"""
