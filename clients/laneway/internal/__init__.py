"""Internal messages between the broker and the workers: not part of the public contract."""
