"""One benchmark case module per op, named after the op; each defines the op's ``SUITE``."""
