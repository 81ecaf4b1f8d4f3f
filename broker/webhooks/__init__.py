"""Signed webhooks with durable delivery: fan-out of job events to delivery messages
on JetStream, and the delivery loop that POSTs them (``laneway webhooks serve``)."""
