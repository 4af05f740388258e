"""Random-weight models in the real key layouts: fixtures for the tests and python -m humanref tiny-models."""
