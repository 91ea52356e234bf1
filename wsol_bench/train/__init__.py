"""Training the classifiers the benchmark explains: data and image cache, the trainer, and the
recipe that turns a configuration into weights the benchmark loads."""
