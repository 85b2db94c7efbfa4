"""The base every stage builds on: errors, the process's runtime (device, precision, seeding,
threads), the run folder's files (written atomically, read without running code), and
writable folders where the user's home has none. Knows nothing of models or recipes."""
