"""Helpers that DDP subprocesses of tests/test_distributed.py import (``tests.distributed.dump``)."""
