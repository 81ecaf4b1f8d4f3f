"""Provider state the whole fleet shares through the ``laneway_providers`` KV bucket:
pure state and codecs (limiter budget, circuit, recent calls, tier shares) and the
store that reads and writes them. Brokers read it; workers read and write it."""
