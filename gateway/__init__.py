"""The gateway: an OpenAI-compatible front door with an exact cache keyed on the fingerprint."""
