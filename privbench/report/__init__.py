"""Tables, charts and pages built from the tidy tables."""
