"""One file per registered architecture (model-library issue)."""
