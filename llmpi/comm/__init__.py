"""Communication: never imports model code; every function takes (buffer, comm)."""
