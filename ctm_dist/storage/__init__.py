"""Where data and checkpoints live: URLs, credentials and a local S3 server."""
