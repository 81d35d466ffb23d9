"""The HTTP front end: app, routes, auth, image decoding (no device, no bank)."""
