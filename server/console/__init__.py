"""The web console: static ES modules served at `/console`, talking to the authenticated JSON routes."""
