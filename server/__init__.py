"""The vpt-serve HTTP server: settings, auth, batching, jobs, routes, CLI."""
