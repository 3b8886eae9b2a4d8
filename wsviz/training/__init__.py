"""Training loop, run store and background jobs (see the training-engine issue)."""
