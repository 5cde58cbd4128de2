"""Small real models used by ``ketch demo``, the tests and the docs."""
