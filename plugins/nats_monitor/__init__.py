"""nats_monitor plugin."""
