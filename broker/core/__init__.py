"""The shared core: what every Laneway process loads (job model, topology, event
log, dead letters, task lifecycle, NATS plumbing, wire codecs)."""
