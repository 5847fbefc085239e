"""The library of the benchmarks in bench/ (loopback only), one module per concern.

- `net`: addresses and sockets; everything refuses an address outside
  127.0.0.0/8 and ::1;
- `procs`: the servers under test as our children (started in a session of
  their own, stopped by their PID, never by name) and /proc readers for what a
  process tree costs: memory, CPU, descriptors, held sockets;
- `servers`: starting repeld and the peers (bench/peers/ recipes for smtp-sink,
  postscreen, HAProxy and NSD; redis-server; bench/taskserver.py);
- `load`: the load processes that hold silent connections and the probes
  that time the greeting and the cut-off;
- `events`: a UDP syslog sink that counts repeld's events;
- `stats`: percentiles, the plain-text table, the machine's facts.
"""
