"""NATS plumbing: the connection and its options, private reply inboxes, and
acknowledged JetStream publish."""
