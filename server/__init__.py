"""The Flower ServerApp, run configuration, central evaluation and reports."""
