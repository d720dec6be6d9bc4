"""The HTTP server: Moondream's wire protocol over the engine. It holds no model state of its own."""
