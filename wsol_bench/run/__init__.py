"""One benchmark run: the map store, the explain and score loops, the scorers a run feeds, and
the runner that assembles them from the configuration."""
