"""Property-based tests of the pure matching core against a naive reference book."""
