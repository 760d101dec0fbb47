"""Nearest-code search (its device programs) and the 3×3 k-means path. Imports model and io."""
