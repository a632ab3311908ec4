"""blobstore plugin."""
