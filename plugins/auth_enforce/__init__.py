"""auth_enforce plugin."""
