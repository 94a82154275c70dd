"""The deployable stacks, wired in app.py: networking -> security -> pipeline."""
