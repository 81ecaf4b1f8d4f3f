"""NATS plumbing: the connection and its options, private reply inboxes, and
acknowledged JetStream publish, and a pull batch that reads "none came" as empty."""
