"""A worker's side of the fleet-wide provider state: the limiter, circuit breakers,
feedback from provider answers, recent-call counts, tier shares, routing."""
