"""Running as a Unix service: start-up order, workers, privileges, pid file, sd_notify, sockets."""
