"""Plans: each target leaf as a lazy expression over stored leaves, built from metadata alone."""
