"""Tables, figures and exports built from a run folder's files."""
