"""Fakes that speak real wire protocols on loopback (never mocks of our own code)."""
