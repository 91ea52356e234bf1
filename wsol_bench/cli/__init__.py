"""The console commands: `wsol-bench` (bench), `wsol-bench-report` (report) and
`wsol-bench-train` (train)."""
