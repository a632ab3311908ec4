"""route_tls plugin."""
