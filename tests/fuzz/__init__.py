"""A gRPC fuzzer for BrokerService: request bodies generated from the proto
descriptors (``bodies``) sent to a live broker and worker (``stack``, ``run``).

``python -m tests.fuzz --requests 10000`` runs it against a fresh stack and prints
its figures; ``make fuzz`` does that. A short run is part of the test suite
(``tests/test_fuzz.py``).
"""
