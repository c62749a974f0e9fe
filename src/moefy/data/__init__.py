"""The task data: reading the user's table, the train / validation / test subset files, length-grouped batches, and models and data fetched from wheels."""
